from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from dpr_hpc.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    """The offline demo's data and tiny models, generated once for the whole session."""
    from dpr_hpc.demo.generate import generate_demo
    from dpr_hpc.stages.runner import quiet_libraries

    quiet_libraries()
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out)
    return out


@pytest.fixture
def data_files(tmp_path) -> Path:
    """Two tiny files in DPR's format, enough for grids that are loaded but not run."""
    record = {"question": "q?", "answers": ["a"], "positive_ctxs": [{"title": "t", "text": "a", "passage_id": "1"}]}
    for name in ("train.json", "dev.json"):
        (tmp_path / name).write_text(json.dumps([record]))
    return tmp_path


def write_grid(folder: Path, text: str, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
