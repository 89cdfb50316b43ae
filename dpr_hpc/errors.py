"""The exceptions callers catch; the CLI maps each to an exit code and a one-line message."""

from __future__ import annotations


class DprHpcError(Exception):
    """Base class: anything dpr-hpc reports to the user without a traceback."""

    exit_code = 1


class GridError(DprHpcError):
    """The grid file (or a command-line argument) is malformed: exit code 2, nothing started."""

    exit_code = 2

    def __init__(self, file: str, key_path: str, expected: str) -> None:
        self.file = file
        self.key_path = key_path
        self.expected = expected
        where = f"{file}: {key_path}" if key_path else file
        super().__init__(f"{where}: {expected}")


class UsageError(DprHpcError):
    """A command-line argument is wrong (a missing run folder, an unknown cell)."""

    exit_code = 2


class StageFailedError(DprHpcError):
    """A stage job ran and raised; its log holds the traceback."""

    exit_code = 1


class ResultInvalidError(DprHpcError):
    """A result record exists but does not validate (truncated, wrong schema, wrong cell)."""
