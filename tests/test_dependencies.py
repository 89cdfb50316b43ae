"""Dependencies we lean on privately are bounded, and the bound holds for what is installed."""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO


def _declared(name: str) -> Requirement:
    (listed,) = re.findall(rf'^\s*"({re.escape(name)}[<>=!~ ][^"]*)",', (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE)
    return Requirement(listed)


def test_submitit_is_bounded_to_the_series_whose_private_api_we_use():
    """backends/slurm.py imports submitit's private _make_sbatch_string and core.utils: a new
    series may change them, or the sbatch scripts they write, without notice."""
    specifier = _declared("submitit").specifier
    installed = Version(metadata.version("submitit"))
    assert installed in specifier, f"submitit {installed} is outside pyproject's bound {specifier}; test it, then move the bound"
    upper = [s for s in specifier if s.operator == "<"]
    assert upper and Version(upper[0].version).minor == installed.minor + 1, "the bound must end with the tested minor series"
    from submitit.core import utils  # noqa: F401 (what the SLURM backend imports)
    from submitit.slurm.slurm import _make_sbatch_string  # noqa: F401
