"""`dpr-hpc completion bash`: the script bash sources completes every command, then the flags of
the command typed, read from the parser itself."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess

import pytest

from conftest import run_cli
from dpr_hpc.cli.main import main
from dpr_hpc.cli.parser import build_parser as _parser
from dpr_hpc.cli.completion import FUNCTION, command_options

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")


def completions(script: str, *words: str) -> list[str]:
    """What bash offers for the last of `words` (the command line typed so far)."""
    line = " ".join(f"'{w}'" for w in ("dpr-hpc", *words))
    program = f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words)}; {FUNCTION}; printf "%s\\n" "${{COMPREPLY[@]}}"'
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.fixture(scope="module")
def script() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["completion", "bash"]) == 0
    return out.getvalue()


def test_every_command_completes_after_the_program_name(script):
    commands = set(command_options(_parser()))
    assert {"plan", "submit", "status", "cancel", "collect", "report", "prefetch", "completion", "bench", "generate-demo"} <= commands
    assert set(completions(script, "")) == commands
    assert completions(script, "pre") == ["prefetch"]


def test_a_commands_flags_complete_after_a_dash(script):
    assert completions(script, "submit", "jobs/paper.yaml", "--ex") == ["--exclude-node"]
    assert set(completions(script, "submit", "--")) >= {"--profile", "--dry-run", "--nodelist", "--exclude-node", "--runs-root"}
    assert completions(script, "prefetch", "--r") == ["--runs-root"]
    assert "--dry-run" not in completions(script, "status", "--")


def test_an_unknown_shell_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        run_cli(capsys, "completion", "fish")
    assert stopped.value.code == 2
