"""The two halves of the package and which way the imports go (docs/design.md, "Layout").

The kernel library (`udat_kernels` and its subpackages other than `udat_kernels.udat`) never
imports the training application (`udat_kernels.udat`), so that a user who only wants the loss
does not load the trainer or its dependencies.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import udat_kernels

PACKAGE_DIR = Path(udat_kernels.__file__).parent
APP = "udat_kernels.udat"
# tqdm is not listed: torch itself imports it.
APP_DEPENDENCIES = ("matplotlib", "sklearn", "mlxtend", "PIL")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_files() -> list[Path]:
    app_dir = PACKAGE_DIR / "udat"
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if app_dir not in p.parents)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every module an import statement in `source` (the text of `module`) names, anywhere in it
    (inside functions and conditionals too), relative imports resolved against its package."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            # `from X import name` may import the submodule X.name as well as an attribute.
            out.append((node.lineno, prefix))
            out += [(node.lineno, f"{prefix}.{alias.name}") for alias in node.names]
    return out


def _file_imports(path: Path) -> list[tuple[int, str]]:
    return imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")


def _is_app(name: str) -> bool:
    return name == APP or name.startswith(APP + ".")


def test_scan_sees_every_kind_of_import():
    """The scanner itself: absolute, relative at any depth, and inside a function."""
    source = ("import os\n"
              "def f():\n"
              "    from ..udat import experiment\n"
              "    from .. import udat\n"
              "    if True:\n"
              "        import udat_kernels.udat.data\n"
              "from . import launch\n")
    names = [n for _, n in imported_modules(source, "udat_kernels.triton_backend.probe")]
    assert [n for n in names if _is_app(n)] == [
        "udat_kernels.udat", "udat_kernels.udat.experiment", "udat_kernels.udat",
        "udat_kernels.udat.data"]
    assert "udat_kernels.triton_backend.launch" in names and "os" in names
    init = imported_modules("from .udat import x\n", "udat_kernels", is_package=True)
    assert [n for _, n in init] == ["udat_kernels.udat", "udat_kernels.udat.x"]


def test_library_never_imports_the_application():
    files = _library_files()
    assert len(files) >= 10, files  # the scan sees the library
    bad = [f"{p.relative_to(PACKAGE_DIR.parent)}:{line}: {name}"
           for p in files for line, name in _file_imports(p) if _is_app(name)]
    assert not bad, "the library imports the application:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["udat_kernels", "udat_kernels.nn", "udat_kernels.schedules",
                                    "udat_kernels.reference"])
def test_import_does_not_load_the_application(module):
    code = (f"import sys, {module}\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {APP_DEPENDENCIES!r} "
            f"or m == {APP!r} or m.startswith({APP!r} + '.'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "", f"import {module} loaded: {out.stdout.strip()}"
