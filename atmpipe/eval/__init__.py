"""Stage three: evaluate SAEs with the registered metric plug-ins (`eval/metrics/`) and write a side-by-side report."""
