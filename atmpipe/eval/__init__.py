"""Stage three: evaluate SAEs (core, absorption, probing, bias) and write a side-by-side report."""
