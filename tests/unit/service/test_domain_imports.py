"""The domain is pure: importing it loads nothing outside the standard library and itself."""
from __future__ import annotations

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
before = set(sys.modules)
import trainguard.service.domain as domain
for m in pkgutil.walk_packages(domain.__path__, domain.__name__ + "."):
    importlib.import_module(m.name)
parents = {"trainguard", "trainguard.service", "trainguard.service.domain"}
bad = sorted(
    m for m in set(sys.modules) - before
    if m.split(".")[0] not in sys.stdlib_module_names and m not in parents and not m.startswith("trainguard.service.domain.")
)
print(bad)
sys.exit(1 if bad else 0)
"""


def test_domain_imports_only_the_standard_library_and_itself():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
