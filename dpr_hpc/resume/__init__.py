"""Resuming interrupted stage jobs: verified checkpoint files and the signals that ask for one."""
