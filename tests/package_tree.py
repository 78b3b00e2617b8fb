"""The package as installed, `trainguard/` with `service/`, `workers/`, ... inside it, built in a
temporary folder for the tools that find modules on disk rather than through the editable
install's import hook (import-linter's grimp, mypy): in the repository the subpackages sit
beside trainguard/, mapped by pyproject's setuptools `package-dir`."""
from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def package_dirs() -> dict[str, Path]:
    """{package name: its folder in the repository} from the package-dir mapping."""
    mapping = pyproject()["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in mapping.items()}


def _copy_python(src: Path, dst: Path) -> None:
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or (not n.endswith(".py") and not (Path(folder) / n).is_dir())]

    shutil.copytree(src, dst, ignore=ignore)


def build_package_tree(dest: Path, *, copy: bool = False) -> Path:
    """Lay out dest/trainguard/ as installed and return dest (the folder to put on sys.path).
    Subpackages are symlinks to the repository's folders, or, with copy=True, copies of their
    Python files that a test may change without touching the working tree."""
    dirs = package_dirs()
    root = dest / "trainguard"
    root.mkdir(parents=True)
    top = dirs.pop("trainguard")
    sources = {entry.name: entry for entry in top.iterdir() if entry.name != "__pycache__"}
    for name, folder in dirs.items():
        parent, _, leaf = name.rpartition(".")
        if parent != "trainguard":  # a deeper mapping would need nesting; none exists
            raise NotImplementedError(f"package-dir entry {name!r}")
        sources[leaf] = folder
    for name, src in sources.items():
        target = root / name
        if not copy:
            os.symlink(src, target, target_is_directory=src.is_dir())
        elif src.is_dir():
            _copy_python(src, target)
        else:
            shutil.copy2(src, target)
    return dest
