"""The one way xbackend touches files a user points at: a link-safe writer, a bounded reader and
loader for untrusted JSON/TOML, and the escaping of untrusted text for a terminal.

Writing never opens an existing file: the data goes to a new file (O_CREAT|O_EXCL|O_NOFOLLOW) in
the destination's directory, is fsynced and renamed over the destination. A destination that is a
symbolic link, not a regular file, or a file with a second hard link is refused, and so is any
directory between the root the user gave and the file that is a link (the walk opens each one with
O_NOFOLLOW and works relative to its descriptor, so a link swapped in meanwhile is not followed).

Reading stats before it opens (a FIFO or a device is refused, never opened for a blocking read),
opens with O_NOFOLLOW|O_NONBLOCK, refuses files over a size limit before reading them, and reads at
most limit + 1 bytes. JSON and TOML are refused when nested deeper than MAX_DEPTH (a bracket pre-scan,
so no parser recursion) or when a number does not fit a float or a 64-bit integer.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from pathlib import Path

from ..errors import XBackendError

MAX_JSON = 64 << 20  # the largest report.json/meta.json/baseline.json a real run writes is well under 1 MB
MAX_DEPTH = 64
MAX_INT_DIGITS = 20  # every unsigned 64-bit seed fits
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


# --------------------------------------------------------------------------- what a path is


def kind_of_mode(mode: int) -> str:
    """A file type in words: 'a directory', 'a FIFO', ..."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _link_error(path, what: str = "") -> XBackendError:
    return XBackendError(f"{path} is a symbolic link{' (' + what + ')' if what else ''}; xbackend neither reads "
                         "nor writes through links in the directories it is given",
                         fix="replace the link by the file or directory itself, or choose another directory")


def _parts(root: Path, path: Path) -> tuple[str, ...]:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    parts = Path(rel).parts
    if rel == ".":
        return ()
    if parts and parts[0] == "..":
        raise ValueError(f"{path} is not inside {root}")
    return parts


def open_dir(root: Path, parts: tuple[str, ...], create: bool) -> int:
    """A descriptor of root/parts..., walked one O_NOFOLLOW component at a time (made when `create`)."""
    root = Path(root)
    if create:
        root.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except NotADirectoryError:
        raise XBackendError(f"{root} is not a directory", fix="pass a directory path") from None
    where = root
    try:
        for part in parts:
            where = where / part
            try:
                nfd = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise _link_error(where, "a directory on the way") from None
                raise XBackendError(f"{where} is {kind_of_mode(st.st_mode)}, not a directory",
                                    fix="remove it or choose another directory") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


_PROTECTED: set[str] = set()


def protect(paths) -> None:
    """Files the writer must never replace in this process: what a user's directory held when a
    command took it with --force (which overwrites nothing it did not create)."""
    _PROTECTED.update(os.path.abspath(p) for p in paths)


def unprotect(paths) -> None:
    """The claim that protected `paths` is released."""
    _PROTECTED.difference_update(os.path.abspath(p) for p in paths)


def _check_destination(dfd: int, name: str, shown: Path) -> None:
    if _PROTECTED and os.path.abspath(shown) in _PROTECTED:
        raise XBackendError(f"{shown} was there before xbackend took its directory with --force, which overwrites "
                            "nothing it did not create", fix="choose a new or empty directory")
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _link_error(shown)
    if not stat.S_ISREG(st.st_mode):
        raise XBackendError(f"{shown} is {kind_of_mode(st.st_mode)}, not a regular file; xbackend replaces only files",
                            fix="choose another path")
    if st.st_nlink > 1:
        raise XBackendError(f"{shown} has {st.st_nlink} hard links; replacing it would change what the other "
                            "names show", fix="remove the extra links (or the file) first, or choose another path")


def replaceable(path) -> None:
    """Refuse now what write_file/open_stream would refuse at `path` (so a command that writes several
    files refuses before the first)."""
    path = Path(path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _check_destination(dfd, path.name, path)
    finally:
        os.close(dfd)


def _split(path, root) -> tuple[Path, tuple[str, ...], str]:
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    return root, _parts(root, path.parent), path.name


def dir_in(path, root=None) -> Path:
    """Make directory `path` (and those between `root` and it), none of them a link; returns `path`."""
    path = Path(path)
    root = Path(root) if root is not None else path
    os.close(open_dir(root, _parts(root, path), create=True))
    return path


class _NewFile:
    """A new file beside `name` in directory `dfd`, renamed over it at `commit()`."""

    def __init__(self, dfd: int, name: str, shown: Path):
        self.dfd, self.name, self.shown = dfd, name, shown
        _check_destination(dfd, name, shown)
        self.tmp = f".{name[:80]}.{secrets.token_hex(6)}.tmp"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666, dir_fd=dfd)

    def commit(self) -> None:
        _check_destination(self.dfd, self.name, self.shown)
        os.replace(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp, dir_fd=self.dfd)
            except OSError:
                pass
            self.tmp = None


def write_file(path, data: bytes, *, root=None) -> None:
    """Write `path` whole or not at all, through no link (see the module docstring); `root` is the
    directory the user gave (default: the file's own folder), below which no component may be a link."""
    root, parts, name = _split(path, root)
    dfd = open_dir(root, parts, create=True)
    try:
        new = _NewFile(dfd, name, Path(path))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(new.fd, view):]
            os.fsync(new.fd)
            os.close(new.fd)
            new.fd = -1
            new.commit()
        except BaseException:
            if new.fd >= 0:
                os.close(new.fd)
            new.discard()
            raise
    finally:
        os.close(dfd)


def write_json(path, data, *, root=None) -> None:
    write_file(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode(), root=root)


def write_text(path, text: str, *, root=None) -> None:
    write_file(path, text.encode("utf-8", "surrogateescape"), root=root)


def write_npy(path, array, *, root=None) -> None:
    """A .npy (no pickle) through the writer."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_file(path, buf.getvalue(), root=root)


def write_wav(path, samples, rate: int, *, root=None) -> None:
    """A 16-bit PCM WAV through the writer."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, subtype="PCM_16", format="WAV")
    write_file(path, buf.getvalue(), root=root)


def open_stream(path, *, root=None):
    """A new, empty file put at `path` at once (the old one, if any, is replaced, never truncated or
    written), open for appending binary data: a trace's step files, flushed step by step."""
    root, parts, name = _split(path, root)
    dfd = open_dir(root, parts, create=True)
    try:
        new = _NewFile(dfd, name, Path(path))
        try:
            new.commit()
        except BaseException:
            os.close(new.fd)
            new.discard()
            raise
        return os.fdopen(new.fd, "wb")
    finally:
        os.close(dfd)


def remove_file(path, *, root) -> bool:
    """Delete regular file `path` (no link on the way from `root`); False when it is not there or not a file."""
    root, parts, name = _split(path, root)
    try:
        dfd = open_dir(root, parts, create=False)
    except (FileNotFoundError, XBackendError):
        return False
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)


MAX_SCAN = 200_000


def links_in(root) -> tuple[Path, str] | None:
    """The first symbolic link, special file or multiply-linked file found in the tree under `root`
    (walked without following links), with what it is; None when there is none."""
    stack, seen = [Path(root)], 0
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            seen += 1
            if seen > MAX_SCAN:
                return Path(root), f"more than {MAX_SCAN} entries"
            st = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return Path(e.path), "a symbolic link"
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(e.path))
            elif not stat.S_ISREG(st.st_mode):
                return Path(e.path), kind_of_mode(st.st_mode)
            elif st.st_nlink > 1:
                return Path(e.path), f"a file with {st.st_nlink} hard links"
    return None


def no_link_between(root, path) -> None:
    """Refuse when a component of `path` below `root` (the file itself included) is a symbolic link."""
    root, path = Path(root), Path(path)
    where = root
    for part in _parts(root, path):
        where = where / part
        if where.is_symlink():
            raise _link_error(where)


# --------------------------------------------------------------------------- reading


def regular_file(path, what: str, fix: str = "pass a regular file", *, follow: bool = False) -> os.stat_result:
    """stat `path`: a regular file, not a FIFO, a device or a directory (one-line errors); a link is
    refused unless `follow` (a file the user named on the command line, not one found in a directory)."""
    path = Path(path)
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise XBackendError(f"{what} {path} does not exist", fix=fix) from None
    except OSError as exc:
        raise XBackendError(f"{what} {path} cannot be read ({exc.strerror})", fix=fix) from None
    if stat.S_ISLNK(st.st_mode):
        raise _link_error(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise XBackendError(f"{what} {path} is not a regular file (it is {kind_of_mode(st.st_mode)})", fix=fix)
    return st


def read_bytes(path, what: str, *, limit: int = MAX_JSON, fix: str = "pass a regular file",
               single_link: bool = False, follow: bool = False) -> bytes:
    """The bytes of untrusted file `path`: a regular file reached through no link, at most `limit`
    bytes (refused from its size before reading; at most limit + 1 bytes are ever read)."""
    path = Path(path)
    st = regular_file(path, what, fix, follow=follow)
    if st.st_size > limit:
        raise XBackendError(f"{what} {path} is {st.st_size} bytes, more than the {limit} xbackend reads", fix=fix)
    if single_link and st.st_nlink > 1:
        raise XBackendError(f"{what} {path} has {st.st_nlink} hard links; it may be a file from outside the directory",
                            fix="replace it by a copy of its own")
    try:
        fd = os.open(path, os.O_RDONLY | (0 if follow else _NOFOLLOW) | _NONBLOCK | _CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(path, what) from None
        raise XBackendError(f"{what} {path} cannot be read ({exc.strerror})", fix=fix) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise XBackendError(f"{what} {path} is not a regular file", fix=fix)
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise XBackendError(f"{what} {path} grew past the {limit} bytes xbackend reads", fix=fix)
    return data


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_TOML_STRING = re.compile(rb'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'', re.S)


def nesting(data: bytes, strings: re.Pattern = _JSON_STRING) -> int:
    """How deep brackets nest in `data`, strings left out (no recursion, linear time)."""
    import numpy as np

    bare = np.frombuffer(strings.sub(b"", data), dtype=np.uint8)
    if not bare.size:
        return 0
    step = np.isin(bare, (91, 123)).astype(np.int64) - np.isin(bare, (93, 125)).astype(np.int64)
    return int(np.cumsum(step).max(initial=0))


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer {text[:24]}... has {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:24]} does not fit a float")
    return value


def parse_json(data: bytes, source: str, fix: str, *, expect: type | None = dict):
    """Untrusted JSON bytes as Python values: UTF-8, nested at most MAX_DEPTH, numbers that fit."""
    depth = nesting(data)
    if depth > MAX_DEPTH:
        raise XBackendError(f"{source} nests {depth} levels deep, more than the {MAX_DEPTH} xbackend reads", fix=fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XBackendError(f"{source} is not UTF-8 ({exc.reason} at byte {exc.start})", fix=fix) from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except (ValueError, RecursionError) as exc:
        raise XBackendError(f"{source} is not valid JSON ({clean(str(exc))[:120]})", fix=fix) from None
    if expect is not None and not isinstance(value, expect):
        raise XBackendError(f"{source} holds {type(value).__name__ if value is not None else 'null'}, "
                            f"expected a JSON {'object' if expect is dict else expect.__name__}", fix=fix)
    return value


def load_json(path, what: str, fix: str, *, limit: int = MAX_JSON, expect: type | None = dict, follow: bool = False):
    """Read and parse one untrusted JSON file (see read_bytes and parse_json)."""
    return parse_json(read_bytes(path, what, limit=limit, fix=fix, follow=follow), f"{what} {path}", fix, expect=expect)


def load_toml(path, what: str, fix: str, *, limit: int = 1 << 20, follow: bool = True) -> dict:
    """Read and parse one untrusted TOML file, with the limits of load_json."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise XBackendError(f"Reading {what} needs Python 3.11+ or the tomli package", fix="pip install tomli") from None

    data = read_bytes(path, what, limit=limit, fix=fix, follow=follow)
    depth = nesting(data, _TOML_STRING)
    if depth > MAX_DEPTH:
        raise XBackendError(f"{what} {path} nests {depth} levels deep, more than the {MAX_DEPTH} xbackend reads", fix=fix)
    try:
        value = tomllib.loads(data.decode("utf-8"), parse_float=_parse_float)
    except UnicodeDecodeError as exc:
        raise XBackendError(f"{what} {path} is not UTF-8 ({exc.reason} at byte {exc.start})", fix=fix) from None
    except (ValueError, RecursionError) as exc:
        raise XBackendError(f"{what} {path} is not valid TOML ({clean(str(exc))[:120]})", fix=fix) from None
    return value


# --------------------------------------------------------------------------- printing untrusted text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return {10: "\\n", 13: "\\r", 9: "\\t"}.get(c) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")


def clean(text, *, lines: bool = False) -> str:
    """`text` safe for a terminal: control characters (ESC, BEL, CR, ...) and lone surrogates escaped
    as `\\x1b`; newlines too unless `lines` (a multi-line block of xbackend's own making)."""
    return (_CONTROL if lines else _CONTROL_LINE).sub(_escape, str(text))


SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, ZeroDivisionError)


def shaped(what, fix: str):
    """A context in which a value of the wrong shape read from an untrusted file (what the schema
    checks let through) is that file's one-line error, never a traceback."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except SHAPE_ERRORS as exc:
            raise XBackendError(f"{what} holds a value of the wrong shape ({type(exc).__name__}: "
                                f"{clean(exc)[:100]})", fix=fix) from None

    return guard()
