"""Every test under tests/integration, tests/e2e and tests/bench carries its folder's marker, so
that `-m "not integration and not e2e and not bench"` (the fast tier, see README) leaves out
everything slow. tests/conftest.py runs `require_folder_markers` on the collected items; a file
without its marker fails the whole session rather than slipping into the fast tier."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

# folder directly under tests/ -> the marker each of its tests must carry
FOLDER_MARKERS: Mapping[str, str] = {"integration": "integration", "e2e": "e2e", "bench": "bench"}


def files_missing_markers(items: Iterable[pytest.Item], tests_root: Path) -> dict[str, str]:
    """{file, as tests_root's name / path below it: the marker it lacks} for collected items that
    lack theirs (a module-level `pytestmark`, a class marker or one on the test itself all count)."""
    missing: dict[str, str] = {}
    for item in items:
        try:
            rel = Path(item.path).resolve().relative_to(tests_root.resolve())
        except ValueError:  # collected from outside this test tree
            continue
        marker = FOLDER_MARKERS.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if marker is not None and item.get_closest_marker(marker) is None:
            missing[(Path(tests_root.name) / rel).as_posix()] = marker
    return dict(sorted(missing.items()))


def require_folder_markers(items: Iterable[pytest.Item], tests_root: Path) -> None:
    missing = files_missing_markers(items, tests_root)
    if missing:
        lines = "\n".join(f"  {path}: add `pytestmark = pytest.mark.{marker}`" for path, marker in missing.items())
        raise pytest.UsageError(f"test files without their folder's marker (see tests/markers.py):\n{lines}")
