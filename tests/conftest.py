"""Fixtures; the helpers every test module shares live in tests/helpers.py."""

from __future__ import annotations

import re
from pathlib import Path
import os

import pytest

# `--compile auto` (the default) compiles what moshi compiles as it ships, ~33 s cold per process on the
# CPU. Tests that are not about compilation run eagerly through upstream's own switch, which `auto`
# respects and every worker inherits; tests/test_compile.py runs compiled, in processes without it.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

from .helpers import registry_scope

# Modules whose tests share a module- or session-scoped fixture (a 200-step capture, the random
# Mimi, a fresh venv): under pytest-xdist each runs whole on one worker, so that fixture is built once.
SHARED_FIXTURE_MODULES = frozenset(
    f"tests/{p.name}" for p in sorted(Path(__file__).parent.glob("test_*.py"))
    if re.search(r"""@pytest\.fixture\([^)]*scope=["'](module|package|session)["']""", p.read_text()))


@pytest.fixture
def registry():
    """The real backend registry for one test: whatever the test registers is gone afterwards."""
    with registry_scope():
        yield


def pytest_xdist_make_scheduler(config, log):
    """`--dist load` (pyproject's addopts), except that a module of SHARED_FIXTURE_MODULES goes to
    one worker as a whole; every other test goes alone to whichever worker is free. (xdist's own
    `loadgroup` cannot do this on pytest 9, whose node ids xdist can no longer suffix with a group.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_FIXTURE_MODULES else nodeid

    return SharedFixtureScheduling(config, log)
