"""Fixtures; the helpers every test module shares live in tests/helpers.py."""

from __future__ import annotations

import pytest

from .helpers import registry_scope


@pytest.fixture
def registry():
    """The real backend registry for one test: whatever the test registers is gone afterwards."""
    with registry_scope():
        yield
