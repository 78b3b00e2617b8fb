"""The layers hold: pyproject's import-linter contracts (domain is pure, workers never import
service, the API reaches the supervisor only through its port), checked here on the installed
layout; and no module imports another module's private names, which import-linter cannot say."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.package_tree import REPO, PYPROJECT, build_package_tree, package_dirs, pyproject

LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-logo", "--no-cache", str(PYPROJECT)],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=120,
    )


def contract_for(source: str) -> str:
    """The name of pyproject's contract whose source is `source`."""
    names = [c["name"] for c in pyproject()["tool"]["importlinter"]["contracts"] if c["source_modules"] == [source]]
    assert len(names) == 1, f"expected one import-linter contract for {source}, found {names}"
    return str(names[0])


def test_import_contracts_hold(tmp_path: Path) -> None:
    r = lint_imports(build_package_tree(tmp_path))
    assert r.returncode == 0, f"lint-imports: contracts broken or invalid\n{r.stdout}{r.stderr}"
    assert "0 broken" in r.stdout, r.stdout


# (file to change in a scratch copy, the line added to it, the source of the contract it breaks)
BREACHES = [
    ("service/domain/state.py", "import fastapi", "trainguard.service.domain"),
    ("service/domain/series.py", "import numpy", "trainguard.service.domain"),
    ("service/domain/policy.py", "from trainguard.service import errors", "trainguard.service.domain"),
    ("service/domain/state.py", "from trainguard.workers import contract", "trainguard.service.domain"),
    ("workers/spec.py", "from trainguard.service.errors import Conflict", "trainguard.workers"),
    ("service/api/deps.py", "from trainguard.service.controller import Controller", "trainguard.service.api"),
    ("service/api/routes/runs.py", "import trainguard.workers.group", "trainguard.service.api"),
    ("service/api/ports.py", "from trainguard.service.supervisor import ingest", "trainguard.service.api"),
]


@pytest.mark.parametrize(("path", "line", "source"), BREACHES, ids=[f"{p}: {line}" for p, line, _ in BREACHES])
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, path: str, line: str, source: str) -> None:
    tree = build_package_tree(tmp_path, copy=True)
    package = tree / "trainguard"
    supervisor = package / "service" / "supervisor"
    supervisor.mkdir(exist_ok=True)
    (supervisor / "__init__.py").touch()  # a package from the start, whether or not it is one yet
    (supervisor / "ingest.py").touch()
    target = package / path
    target.write_text(target.read_text() + f"\n{line}\n")

    r = lint_imports(tree)

    assert r.returncode != 0 and f"{contract_for(source)} BROKEN" in r.stdout, r.stdout + r.stderr


# --- private names -------------------------------------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Modules:
    """trainguard's modules as they sit in the repository (pyproject's package-dir mapping)."""

    def __init__(self) -> None:
        # deepest packages first: `trainguard.service.x` is in service/, not in trainguard/
        self.dirs = sorted(package_dirs().items(), key=lambda kv: kv[0].count("."), reverse=True)

    def files(self) -> Iterator[Path]:
        for _, folder in self.dirs:
            yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)

    def name_of(self, path: Path) -> str:
        for package, folder in sorted(self.dirs, key=lambda kv: len(kv[1].parts), reverse=True):
            if path.is_relative_to(folder):
                parts = list(path.relative_to(folder).with_suffix("").parts)
                return ".".join([package, *parts[: -1 if parts[-1] == "__init__" else None]])
        raise ValueError(path)

    def exists(self, module: str) -> bool:
        for package, folder in self.dirs:
            if module == package or module.startswith(package + "."):
                base = folder.joinpath(*module[len(package):].split(".")[1:])
                return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
        return False


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def private_name_uses(source: str, module: str, is_package: bool, modules: Modules) -> list[str]:
    """In `module`'s source: `from trainguard... import _name`, and `alias._name` where alias is
    an imported trainguard module; as "line: what", in line order."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> trainguard module it is bound to
    uses: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "trainguard":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "trainguard"
        elif isinstance(node, ast.ImportFrom):
            imported = _absolute(node, module, is_package)
            if imported.split(".")[0] != "trainguard":
                continue
            for a in node.names:
                if _private(a.name):
                    uses.append((node.lineno, f"from {imported} import {a.name}"))
                elif modules.exists(f"{imported}.{a.name}"):
                    aliases[a.asname or a.name] = f"{imported}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = _dotted(node.value)
            if owner is None or owner.split(".")[0] not in aliases:
                continue
            head, _, rest = owner.partition(".")
            resolved = aliases[head] + (f".{rest}" if rest else "")
            if modules.exists(resolved):
                uses.append((node.lineno, f"{owner}.{node.attr} (module {resolved})"))
    return [f"{line}: {what}" for line, what in sorted(uses)]


def test_no_module_imports_another_modules_private_names() -> None:
    modules = Modules()
    offenders = [
        f"{path.relative_to(REPO)}:{use}"
        for path in modules.files()
        for use in private_name_uses(path.read_text(), modules.name_of(path), path.name == "__init__.py", modules)
    ]
    assert not offenders, "private names used across modules (make them public or keep them local):\n" + "\n".join(offenders)


def test_the_private_name_check_sees_both_forms() -> None:
    source = (
        "from trainguard.service.db.crud import _hidden, public\n"
        "from ..db import crud\n"
        "import trainguard.service.errors as errors\n"
        "from . import _private_module\n"
        "import trainguard.workers.spec\n"
        "crud._helper()\nerrors._code\ntrainguard.workers.spec._check()\ncrud.public\nself._fine\n"
    )
    uses = private_name_uses(source, "trainguard.service.api.probe", False, Modules())

    assert uses == [
        "1: from trainguard.service.db.crud import _hidden",
        "4: from trainguard.service.api import _private_module",
        "6: crud._helper (module trainguard.service.db.crud)",
        "7: errors._code (module trainguard.service.errors)",
        "8: trainguard.workers.spec._check (module trainguard.workers.spec)",
    ]
