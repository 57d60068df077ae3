"""Fixtures; the helpers every test module shares live in tests/helpers.py."""

from __future__ import annotations

import os

import pytest

# `--compile auto` (the default) compiles what moshi compiles as it ships, ~33 s cold per process on the
# CPU. Tests that are not about compilation run eagerly through upstream's own switch, which `auto`
# respects and every worker inherits; tests/test_compile.py runs compiled, in processes without it.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

from .helpers import registry_scope


@pytest.fixture
def registry():
    """The real backend registry for one test: whatever the test registers is gone afterwards."""
    with registry_scope():
        yield
