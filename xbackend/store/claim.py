"""Output directories: whose they are, and who is writing into them now.

Every directory xbackend writes (a trace, a run directory, a baseline, a repeat) carries a small
`.xbackend` file naming its kind. A command may write into a directory that does not exist, is
empty, or is already the same kind of xbackend output; anything else (a user's directory, a
baseline given as a run directory's --out) is refused unless `force`. The same file is held
under an exclusive `flock` for as long as the command writes, so a second writer is refused
instead of mixing its data with the first's; the kernel drops the lock when the process dies.
A directory taken with `force` stays marked `adopted`: the claim says it is not xbackend's own
(`Claim.owned` is false), so no later run clears anything there. Nothing here deletes anything.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import XBackendError

MARKER = ".xbackend"
MAX_THEIRS = 100_000  # files of a user's directory remembered (and never replaced) once --force took it
KINDS = ("trace", "run", "baseline", "repeat", "matrix", "codec", "replay")
# Files that mark a directory written by an earlier xbackend (before the marker existed).
_LEGACY = {"trace": ("meta.json", "xbackend.trace/1"), "run": ("report.json", "xbackend.report/1"),
           "baseline": ("baseline.json", "xbackend.baseline/1"), "repeat": ("repeat.json", "xbackend.repeat/1"),
           "matrix": ("matrix.json", "xbackend.matrix/1"), "codec": ("report.json", "xbackend.codec/1"),
           "replay": ("replay.json", "xbackend.replay/1")}


def _read_small(file: Path) -> dict:
    from .files import load_json

    try:
        return load_json(file, "xbackend marker", "", limit=1 << 24)
    except XBackendError:
        return {}


def kind_of(path: Path) -> str | None:
    """Which kind of xbackend output `path` holds, or None."""
    kind = _read_small(path / MARKER).get("kind")
    if kind in KINDS:
        return kind
    for kind, (name, schema) in _LEGACY.items():
        if _read_small(path / name).get("schema") == schema:
            return kind
    return None


@dataclass
class Claim:
    """An output directory held by this process until `release()` (or its death)."""

    path: Path
    kind: str
    fd: int | None = None
    owned: bool = True  # xbackend made it (new, empty or already ours): its earlier output may be cleared
    theirs: tuple[str, ...] = ()  # files the directory held when --force took it: never replaced

    def release(self) -> None:
        if self.fd is not None:
            from .files import unprotect

            unprotect(self.path / rel for rel in self.theirs)
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(path: str | os.PathLike, kind: str, *, force: bool = False, what: str = "--out") -> Claim:
    """Take `path` for writing output of `kind`; refuse a directory in use or not ours."""
    from .files import dir_in, links_in, protect

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise XBackendError(f"{what} {path} exists and is not a directory", fix=f"pass a directory path to {what}")
    for above in list(path.absolute().parents)[:6]:  # a committed baseline's traces are written by `baseline create` only
        if kind_of(above) == "baseline":
            raise XBackendError(f"{what} {path} is inside the xbackend baseline {above}",
                                asked="writing there would change a committed baseline",
                                fix=f"choose a {what} outside it (baseline create makes baselines)")
    owned, theirs = True, ()
    if path.is_dir():
        planted = links_in(path)
        if planted is not None:
            raise XBackendError(f"{what} {path} holds {planted[1]} ({planted[0]}); xbackend writes through no link "
                                "and replaces no file that has another name",
                                fix=f"remove it, or choose a new or empty {what} directory")
        found = kind_of(path)
        busy = [p.name for p in path.iterdir() if p.name != MARKER]
        if found is not None and found != kind:
            raise XBackendError(f"{what} {path} holds an xbackend {found}, not a {kind} directory",
                                asked="writing there would overwrite it",
                                fix=f"choose another {what} directory")
        if found is None and busy and not force:
            shown = ", ".join(sorted(busy)[:5]) + (", ..." if len(busy) > 5 else "")
            raise XBackendError(f"{what} {path} is not empty and was not written by xbackend",
                                asked=f"it holds {shown}",
                                fix=f"choose a new or empty directory, or pass --force to write xbackend's files "
                                    "beside them (nothing there is deleted)")
        adopted = _adopted(path)
        owned = not adopted and (found is not None or not busy)
        if adopted:  # what the directory held when --force first took it stays as it is, on every later run
            listed = _read_small(path / MARKER).get("theirs")
            theirs = tuple(r for r in listed if isinstance(r, str))[:MAX_THEIRS] if isinstance(listed, list) else ()
        elif not owned:
            theirs = tuple(sorted(str(p.relative_to(path)) for p in path.rglob("*")
                                  if p.name != MARKER and not p.is_dir()))[:MAX_THEIRS]
    dir_in(path)
    marker = path / MARKER
    try:
        fd = os.open(marker, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if marker.is_symlink():
            raise XBackendError(f"{marker} is a symbolic link; xbackend writes through none",
                                fix="remove the link or choose another output directory") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        holder = ""
        try:
            holder = json.loads(marker.read_text() or "{}").get("pid", "")
        except (ValueError, OSError, AttributeError):
            pass
        raise XBackendError(f"{what} {path} is in use by another xbackend run" + (f" (pid {holder})" if holder else ""),
                            fix=f"wait for it to finish, or choose another {what} directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"kind": kind, "pid": os.getpid(), "adopted": not owned, "theirs": list(theirs)}).encode())
    protect(path / rel for rel in theirs)
    return Claim(path, kind, fd, owned, theirs)


def _adopted(path: Path) -> bool:
    """Whether an earlier `--force` took `path` although xbackend had not made it."""
    return _read_small(path / MARKER).get("adopted") is True


def overlaps(a: Path, b: Path) -> bool:
    """Is one directory the other, or inside it? (Writing to `b` could then overwrite `a`.)"""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def inside(root: Path, rel, what: str) -> Path:
    """`root / rel` for a path read from untrusted metadata: relative, no `..`, no link on the way.

    Run directories and baselines come from other people (bundles, repositories); a path in their
    JSON must not reach a file outside them (an absolute path or a link would pull it into a bundle)."""
    from pathlib import PurePosixPath, PureWindowsPath

    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise XBackendError(f"{what} is {rel!r}, not a relative path", fix="regenerate the directory with xbackend")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive \
            or ".." in parts:
        raise XBackendError(f"{what} is {rel!r}: paths in metadata must stay inside {root}",
                            asked="absolute paths and '..' are refused, so nothing outside the directory is read",
                            fix="regenerate the directory with xbackend")
    path = root
    for part in parts:
        if part in ("", "."):
            continue
        path = path / part
        if path.is_symlink():
            raise XBackendError(f"{what} {rel!r} goes through the symbolic link {path}",
                                asked="links are not followed, so nothing outside the directory is read",
                                fix="replace the link by the files themselves")
    return path


def read_json(file: Path, what: str, fix: str):
    """An untrusted JSON file of a run directory or baseline (the one loader: no link, size, depth)."""
    from .files import load_json

    return load_json(file, what, fix, expect=None)
