"""Each package imports only its own layer or lower ones, so the layout reads as the data flow and a
change low in the stack cannot be made to depend on the commands above it (issue 22)."""

from __future__ import annotations

import ast
from pathlib import Path

import dpr_hpc

LAYERS = [  # lowest first; a module may import from its own layer or any below it
    ["errors", "fsutil", "locks", "provenance"],
    ["grid"],
    ["inputs", "demo"],
    ["planning"],
    ["modeling", "scoring", "resume"],
    ["store"],
    ["tracking"],
    ["stages"],
    ["backends"],
    ["reporting"],
    ["bench"],
    ["api"],
    ["cli", "__main__", "__init__"],
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}
ROOT = Path(dpr_hpc.__file__).parent


def _layer(dotted: str) -> int | None:
    """The layer of `dpr_hpc.X...`; None for third-party modules. `import dpr_hpc` is the facade."""
    parts = dotted.split(".")
    if parts[0] != "dpr_hpc":
        return None
    return LAYER_OF["__init__" if len(parts) == 1 else parts[1]]


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Every import in a module, function-local ones included, as (line, dotted name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            base = node.module
            # `from dpr_hpc import tracking` names a package; `from dpr_hpc import load_results` the facade
            found += [(node.lineno, f"{base}.{a.name}" if base == "dpr_hpc" and a.name in LAYER_OF else base)
                      for a in node.names]
    return found


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(("dpr_hpc", *path.relative_to(ROOT).with_suffix("").parts))
        own = _layer(module.removesuffix(".__init__") if path.parent != ROOT else module)
        for line, target in _imports(ast.parse(path.read_text(), str(path))):
            theirs = _layer(target)
            if theirs is not None and theirs > own:
                upward.append(f"{module}:{line} (layer {own}, {'/'.join(LAYERS[own])}) imports {target} "
                              f"(layer {theirs}, {'/'.join(LAYERS[theirs])})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
