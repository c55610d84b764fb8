"""The package's layers: method <- REC pipeline <- evidence and command line, and nothing imports upwards.

Every ``import`` statement of every module is read (function-level ones too), so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "m2ist"

#: The method: frozen towers, taps, side network, head, saving and the Hub.
METHOD = {"config", "taps", "towers", "layer", "head", "model", "provenance", "save_and_load", "staging", "card", "hub",
          "reference", "version", "ops"}
#: The REC pipeline, on top of the method.
PIPELINE = {"processing", "inference", "evaluation", "trainer", "data", "cache"}
#: The top: what proves the library and what drives it. The library never imports these.
TOP = {"evidence", "cli", "app"}


def _layer_of(module: str) -> str | None:
    """The top-level part of ``m2ist.<part>...`` (``None`` for the package face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "m2ist" else None


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` for every import statement in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [alias.name for alias in node.names]
            found.append((node.lineno, base, names))
            # `from m2ist import evidence` / `from . import cli` name a layer in the imported names
            found.extend((node.lineno, f"{base}.{name}", []) for name in names if base == "m2ist")
    return found


def _modules(layers: set[str], face: bool) -> list[Path]:
    """The modules of ``layers``, and the package face (``m2ist/__init__.py``) when ``face``."""
    return [path for path in sorted(PACKAGE.rglob("*.py"))
            if (_layer_of(_module_name(path)) or ("face" if face else "")) in layers | ({"face"} if face else set())]


def _violations(importers: set[str], forbidden: set[str], face: bool = False) -> list[str]:
    bad = []
    for path in _modules(importers, face):
        for line, target, _ in _imports(path):
            if _layer_of(target) in forbidden:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return bad


def test_the_library_never_imports_the_evidence_or_the_command_line():
    assert _violations(METHOD | PIPELINE, TOP, face=True) == []


def test_the_method_never_imports_the_rec_pipeline():
    assert _violations(METHOD, PIPELINE) == []


def test_the_layer_lists_cover_every_module():
    """A new top-level module must be placed in a layer here, or the guards above would not see it."""
    known = METHOD | PIPELINE | TOP
    unplaced = sorted({_layer_of(_module_name(p)) for p in PACKAGE.rglob("*.py")} - known - {None})
    assert unplaced == []


def test_no_module_takes_the_version_from_the_package_face():
    """``from m2ist import __version__`` inside the package would import everything the face imports."""
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"
           for line, target, names in _imports(path) if target == "m2ist" and "__version__" in names]
    assert bad == []


def test_the_guard_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: a function-level relative import of the evidence counts as a violation."""
    fake = tmp_path / "m2ist"
    fake.mkdir()
    (fake / "model.py").write_text("def f():\n    from .evidence import demo\n    from . import cli\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert sorted(v.split(" imports ")[1] for v in _violations(METHOD, TOP)) == ["m2ist.cli", "m2ist.evidence"]


@pytest.mark.parametrize("entry", ["m2ist", "m2ist.trainer", "m2ist.evaluation", "m2ist.data", "m2ist.reference",
                                   "m2ist.hub"])
def test_importing_the_library_loads_no_evidence_module(entry):
    code = (f"import sys, {entry}, m2ist; "
            "bad = sorted(m for m in sys.modules if m.startswith(('m2ist.evidence', 'm2ist.cli'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
