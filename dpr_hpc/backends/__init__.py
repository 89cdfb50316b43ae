"""Backends decide where and when stage jobs run; the stages themselves know nothing of them."""
