"""The eval's computations: each metric plug-in in `atmpipe/eval/metrics/` imports its module here only when
it runs (torch, sklearn, the LM), so that the command line, which builds its flags from the plug-ins, stays
light."""
