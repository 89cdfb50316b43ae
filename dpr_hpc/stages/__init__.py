"""The three DPR stages, each a plain function of (cell config, run folder, repeat)."""
