"""The command line: parse arguments, call the service layer (`dpr_hpc.api`), render, exit code."""

from dpr_hpc.cli.main import main

__all__ = ["main"]
