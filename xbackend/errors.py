"""The one exception family xbackend raises for things a user can fix.

The CLI prints the message of an `XBackendError` on one line, without a traceback, and
exits with its `exit_code`: 2 bad input, 3 backend unavailable or failed (docs/design.md, Exit codes).
"""

from __future__ import annotations


class XBackendError(Exception):
    """A user-facing error: what failed, what was asked, what exists, and the fix."""

    exit_code = 2

    def __init__(self, what: str, *, asked: str | None = None, fix: str | None = None):
        parts = [what.rstrip(".") + "."]
        if asked:
            parts.append(f"Note: {asked.rstrip('.')}.")
        if fix:
            parts.append(f"Fix: {fix.rstrip('.')}.")
        super().__init__(" ".join(parts))


class BackendUnavailable(XBackendError):
    """The backend cannot run on this machine (missing library or hardware)."""

    exit_code = 3


class BackendFailed(XBackendError):
    """The backend started but crashed, hung or produced invalid numbers."""

    exit_code = 3
