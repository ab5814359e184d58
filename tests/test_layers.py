"""The package's layers (``nas/__init__.py``): no module imports a layer it may not.

Two checks, because a lazy import inside a function escapes the first and only runs sometimes:
- in a fresh interpreter, importing every module of a layer loads no package of a layer above it
  (nor torch / ONNX Runtime / a database driver where the layer promises to start without them);
- statically, every ``import`` statement in the layer's files (at module level or inside a
  function) names only allowed layers.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

NAS = Path(__file__).resolve().parents[1] / "nas"

# layer -> the nas packages its modules may import (itself included)
ALLOWED: dict[str, set[str]] = {
    "spec": {"spec"},
    "stages": {"spec", "stages"},
    "store": {"spec", "store"},
    "search": {"spec", "stages", "store", "search"},
    "winner": {"spec", "stages", "store", "winner"},
    "faces": {"spec", "stages", "store", "search", "winner", "faces"},
}
# third-party packages a layer must start without (so the store, the web page and `nas spaces`
# start fast)
HEAVY_FORBIDDEN: dict[str, set[str]] = {
    "spec": {"torch", "onnxruntime", "onnx", "sqlalchemy", "optuna", "ray"},
    "store": {"torch", "onnxruntime", "onnx", "optuna", "ray"},
}


def _modules(layer: str) -> list[str]:
    out = []
    for path in sorted((NAS / layer).rglob("*.py")):
        rel = path.relative_to(NAS.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _nas_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported nas module) for every import statement in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "nas"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nas":
            if node.module == "nas":
                found += [(node.lineno, f"nas.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_module_lives_in_a_layer() -> None:
    loose = [p.name for p in NAS.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules outside every layer: {loose}"
    layers = {p.name for p in NAS.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert layers == set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_statement_reaches_a_layer_it_may_not(layer: str) -> None:
    bad = []
    for path in sorted((NAS / layer).rglob("*.py")):
        for line, module in _nas_imports(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(NAS.parent)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_importing_a_layer_loads_no_higher_layer(layer: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {_modules(layer)!r}:\n"
        "    if not m.endswith('__main__'):\n"
        "        importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    higher = {m for m in loaded if m.startswith("nas.") and m.split(".")[1] not in ALLOWED[layer]}
    assert not higher, f"importing nas.{layer} loaded {sorted(higher)}"
    heavy = {m for m in loaded if m.split(".")[0] in HEAVY_FORBIDDEN.get(layer, set())}
    assert not {m.split(".")[0] for m in heavy}, f"importing nas.{layer} loaded {sorted(heavy)[:10]}"


def test_the_layer_checker_sees_a_nested_import(tmp_path: Path) -> None:
    # the static check must see imports inside functions, where lazy imports hide
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from nas.search.study import Search\n    import nas.faces.plots\n")
    assert _nas_imports(f) == [(2, "nas.search.study"), (3, "nas.faces.plots")]
