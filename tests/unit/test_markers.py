"""The folder-marker rule of tests/markers.py, run by pytest itself on a tiny generated test tree
whose conftest installs the same hook as tests/conftest.py."""
from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
from pathlib import Path

import pytest

from tests.markers import require_folder_markers


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    require_folder_markers(items, Path(__file__).parent)
"""
INI = """
[pytest]
markers =
    integration: x
    e2e: x
    bench: x
"""
PASSING = "def test_one():\n    pass\n"
MARKED = "import pytest\n\npytestmark = pytest.mark.{marker}\n\n" + PASSING


@pytest.fixture
def tree(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.mkdir("unit")
    for folder in ("integration", "e2e", "bench"):
        pytester.mkdir(folder)
        (pytester.path / folder / f"test_{folder}_marked.py").write_text(MARKED.format(marker=folder))
    (pytester.path / "unit" / "test_plain.py").write_text(PASSING)
    return pytester


def test_a_tree_whose_slow_files_all_carry_their_marker_runs(tree: pytest.Pytester) -> None:
    result = tree.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_a_file_without_its_folder_marker_fails_the_session(tree: pytest.Pytester) -> None:
    (tree.path / "integration" / "test_unmarked.py").write_text(PASSING)
    (tree.path / "bench" / "test_wrong_marker.py").write_text(MARKED.format(marker="e2e"))

    result = tree.runpytest("-p", "no:cacheprovider", "-m", "not integration and not e2e and not bench")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        "*test files without their folder's marker*",
        "*bench/test_wrong_marker.py: add `pytestmark = pytest.mark.bench`",
        "*integration/test_unmarked.py: add `pytestmark = pytest.mark.integration`",
    ])


def test_markers_on_every_test_count_as_well_as_a_module_mark(tree: pytest.Pytester) -> None:
    (tree.path / "e2e" / "test_per_test.py").write_text(
        "import pytest\n\n\n@pytest.mark.e2e\ndef test_a():\n    pass\n\n\n"
        "class TestB:\n    pytestmark = pytest.mark.e2e\n\n    def test_b(self):\n        pass\n")
    result = tree.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
