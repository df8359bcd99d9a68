"""The file I/O under run files and traces: atomic writes, and bounded, checked JSON reads.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so
a crash mid-write leaves the old file or none, never half of one. Every file is read as one from
anyone may be: regular files only, a bounded size once decompressed, bounded nesting and numbers.
No torch, no extension: :mod:`stepscope.run` and :mod:`stepscope.export` read saved runs without
them.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import gzip
import json
import math
import os
import re
import stat
import tempfile
import zlib
from typing import Any, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

# ---------------------------------------------------------------------------------------- write
# Temporary files of a write in progress: ".<target name>.stepscope-<pid>-<random>.tmp" beside the
# target. A writer killed mid-write (kill -9, a power cut) leaves one behind; the next write of the
# same target removes those whose process is gone from this machine, or that are older than
# _STALE_TMP_S (a writer on another machine sharing the folder).
_TMP_TAG = ".stepscope-"
_STALE_TMP_S = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or no way to tell: leave its file alone
    return True


def _remove_stale_temporaries(folder: str, base: str) -> None:
    prefix = "." + base + _TMP_TAG
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    now = datetime.datetime.now().timestamp()
    for name in names:
        pid_text = name[len(prefix):].split("-", 1)[0]
        full = os.path.join(folder, name)
        try:
            old = now - os.lstat(full).st_mtime > _STALE_TMP_S
            if old or (pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))):
                os.unlink(full)
        except OSError:
            pass  # gone already, or not ours to remove


def _atomic_write(path: PathLike, data: bytes) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _remove_stale_temporaries(folder, base)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}{_TMP_TAG}{os.getpid()}-", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        # mkstemp makes the file private (0600); the result should have the mode open() would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def _write_error(path: str, e: OSError) -> OSError:
    """The OSError of a failed write, naming the target (not the temporary file beside it)."""
    why = "it is a folder" if os.path.isdir(path) else (e.strerror or str(e))
    return _os_error(e, f"stepscope: cannot write {path}: {why}")


def _os_error(e: OSError, message: str) -> OSError:
    """An OSError of e's type and errno whose str() is ``message`` alone (no "[Errno n]")."""
    err = type(e)(message)
    err.errno = e.errno
    return err


# A moderate level: with the ring's JSON written in C++, gzip became most of a compressed write. A
# 4096-step trace (6.2 MB of JSON) gzips here in 55 ms to 841 KiB at level 4, 91 ms to 776 KiB at
# zlib's default 6 (level 1: 31 ms, 953 KiB; level 9 took 235 ms); its run file (3.2 MB) in 46 ms
# to 731 KiB at 4, 98 ms to 680 KiB at 6.
GZIP_LEVEL = 4


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a run's data, a trace or a file is built or parsed:
    those make hundreds of thousands of objects and no cycles, and each collection they triggered
    walked every one of them (more than half the time of building a 4096-step ring's data)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _encode(obj: Any, path: PathLike) -> bytes:
    with _gc_paused():
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return _compress(text, path)


def _compress(text: bytes, path: PathLike) -> bytes:
    """JSON text as a file holds it: gzip'd when ``path`` ends in ``.gz``."""
    # mtime=0: the same run gives the same bytes.
    return gzip.compress(text, compresslevel=GZIP_LEVEL, mtime=0) if os.fspath(path).endswith(".gz") else text


def _finite(x: Any) -> Any:
    """JSON has no NaN/Infinity: such values become None (standard JSON any reader accepts)."""
    t = type(x)  # the exact types first: a run's data is hundreds of thousands of these
    if t is float:
        return x if math.isfinite(x) else None
    if t is str or t is int or t is bool or x is None:
        return x
    if t is dict:
        return {k if type(k) is str else str(k): _finite(v) for k, v in x.items()}
    if t is list:
        return [_finite(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    try:  # numpy / 0-d tensor scalars in a diagnosis' evidence
        return _finite(float(x))
    except (TypeError, ValueError):
        return str(x)


# ----------------------------------------------------------------------------------------- read
#: The most bytes :func:`load`, :func:`read_trace` and the command line read from one file (after
#: decompression); larger files are refused. Pass ``max_bytes=`` (``--max-bytes`` on the command
#: line) to read a larger one: a run file is a few MB, a ring of 10^5 steps about 100 MB.
MAX_READ_BYTES = 512 * 2**20
# The deepest nesting a run or trace file has is 6; anything much deeper is not one of ours, and
# Python's JSON parser would end in a RecursionError on it.
_MAX_JSON_DEPTH = 32
# Numbers in a run file are seconds, counts, bytes and a wall-clock time in ns: all far below 2^63.
# A larger one (or 1e999, NaN, Infinity) is damage, and would overflow the exports' arithmetic.
_MAX_NUMBER = float(2**63)


def _check_max_bytes(max_bytes: Optional[int]) -> int:
    if max_bytes is None:
        return MAX_READ_BYTES
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"stepscope: max_bytes must be an int >= 1; got {max_bytes!r}")
    return max_bytes


def _read_bytes(p: str, what: str, limit: int) -> bytes:
    """The file's bytes (gunzipped when it is gzip), at most ``limit`` of them; only regular files."""
    try:
        # O_NONBLOCK: opening a FIFO nobody writes must not hang; it is refused just below.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"stepscope: no such file: {p}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"stepscope: {p} is a folder, not a {what}") from None
    except OSError as e:
        raise _os_error(e, f"stepscope: cannot read {p}: {e.strerror or e}") from None
    # A folder opens read-only on Linux and fails only in fdopen (EISDIR, named by the fd): asked first.
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(f"stepscope: {p} is a folder, not a {what}")
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise ValueError(f"stepscope: {p} is {kind}, not a {what} (only regular files are read)")
        head = f.read(2)
        f.seek(0)
        gz = head == b"\x1f\x8b"
        try:
            raw = (gzip.GzipFile(fileobj=f, mode="rb") if gz else f).read(limit + 1)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"stepscope: {p} is a damaged gzip file: {e}") from None
    if len(raw) > limit:
        raise ValueError(f"stepscope: {p} holds more than {limit} bytes{' once decompressed' if gz else ''}, the "
                         f"most read by default; pass max_bytes= (or --max-bytes) to read it")
    return raw


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _check_tree(obj: Any, p: str) -> None:
    """Refuses nesting deeper than _MAX_JSON_DEPTH and numbers outside +-2^63 (iteratively)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > _MAX_JSON_DEPTH:
                raise ValueError(f"stepscope: {p} is nested deeper than {_MAX_JSON_DEPTH} levels: not a "
                                 "stepscope file")
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            if not abs(x) < _MAX_NUMBER:  # NaN fails this too
                raise ValueError(f"stepscope: {p} is damaged: it holds the number {x!r:.40}, outside the "
                                 "range a stepscope file holds")


_PARTIAL_NUMBER = re.compile(r"-?[0-9]*\.?[0-9]*(?:[eE][+-]?[0-9]*)?")


def _cut_short(e: Exception) -> bool:
    """Whether a JSON error says the text is a JSON object or array that stops before its end."""
    if not isinstance(e, json.JSONDecodeError):
        return False
    doc = e.doc
    if not doc.lstrip().startswith(("{", "[")):
        return False
    if e.msg.startswith("Unterminated string"):  # reported at the string's start: it runs to the end
        return True
    # The error at the end, or at a token the cut left unfinished: tru, nul, -, 1., 2e+
    tail = doc[e.pos:].rstrip()
    return tail == "" or any(w.startswith(tail) for w in ("true", "false", "null")) or \
        _PARTIAL_NUMBER.fullmatch(tail) is not None


def _read_json(path: PathLike, what: str, max_bytes: Optional[int] = None) -> tuple:
    """(path as str, the decoded JSON) of a JSON or gzip'd JSON file, with one-line errors: only
    regular files, at most ``max_bytes`` (default :data:`MAX_READ_BYTES`) once decompressed,
    nesting and numbers bounded."""
    p = os.fspath(path)
    raw = _read_bytes(p, what, _check_max_bytes(max_bytes))
    try:
        with _gc_paused():
            obj = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"stepscope: {p} is nested deeper than {_MAX_JSON_DEPTH} levels: not a stepscope "
                         "file") from None
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        if _cut_short(e):
            raise ValueError(f"stepscope: {p} is damaged: its JSON stops after {len(raw)} bytes, mid-way (a "
                             f"{what} cut short: a full disk, or a copy that did not finish?)") from None
        raise ValueError(f"stepscope: {p} is not a {what} (not JSON: {e})") from None
    _check_tree(obj, p)
    return p, obj


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


