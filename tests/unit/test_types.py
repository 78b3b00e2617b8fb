"""`mypy --strict` (pyproject's [tool.mypy]) over the modules held to it. mypy finds modules on
disk, not through the editable install, so it runs on the installed layout built by
tests/package_tree.py; the modules these import are read for their types, not checked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.package_tree import PYPROJECT, build_package_tree

# The modules held to --strict, as paths in the installed layout. Add a module once it passes.
STRICT = [
    "trainguard/__init__.py",
    "trainguard/resources.py",
    "trainguard/service/domain/policy.py",
    "trainguard/service/domain/state.py",
    "trainguard/service/domain/series.py",
    "trainguard/service/domain/evaluate.py",
    "trainguard/service/domain/detectors",
    "trainguard/service/cli_format.py",
    "trainguard/service/controller.py",
    "trainguard/service/supervisor",
]


def test_strict_modules_type_check(tmp_path: Path) -> None:
    tree = build_package_tree(tmp_path / "tree")
    missing = [m for m in STRICT if not (tree / m).exists()]
    assert not missing, f"STRICT names files that do not exist: {missing}"

    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(tmp_path / "cache"),
         "--no-error-summary", "--hide-error-context", *STRICT],
        cwd=tree, env={**os.environ, "MYPYPATH": str(tree)}, capture_output=True, text=True, timeout=300,
    )

    assert r.returncode == 0, f"mypy --strict found errors:\n{r.stdout}{r.stderr}"
