"""Atomic file writes, the one helper every layer uses: readers see the old file or the
complete new one, never a part.

It lives beside the configuration because that is the base layer: ``workers``, ``slurm``,
``orchestrator`` and ``dashboards`` all import from here and from nothing below them.

A write goes to a hidden temporary name in the final directory (``.<name>.tmp-<random>``,
which ``Lake.vacuum`` and plain Parquet readers recognise as unfinished), is flushed and
fsynced, renamed over the final name, and the directory is fsynced so that the rename
survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator

TMP_MARK = ".tmp-"  # temporary names: ".<final name>.tmp-<random>"


def tmp_path(final: str | Path) -> Path:
    """A fresh hidden temporary name next to ``final``."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, permissions: int = 0o644,
                 before_rename: Callable[[], None] | None = None, **open_kwargs) -> Iterator[IO]:
    """Open a hidden temporary file next to ``path``; on a clean exit flush, fsync and rename it
    over ``path`` (then fsync the directory); on an exception remove it and leave ``path`` as it
    was. ``permissions``: the new file's mode (e.g. 0o600 for secrets; the umask still applies).
    ``before_rename``: called last thing before the rename; raising there drops the write (a
    fencing check, ``workers.fencing``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str, *, permissions: int = 0o644,
                      before_rename: Callable[[], None] | None = None) -> Path:
    """``path.write_text(text)``, atomically (``before_rename`` as in :func:`atomic_write`)."""
    with atomic_write(path, permissions=permissions, before_rename=before_rename) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON (with a final newline), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# ---- a full disk: the node's fault, not the work's -----------------------------------------

LOW_SPACE_BYTES = 1 << 20  # under this much free space, a failed write is put down to a full disk


class NoSpaceError(OSError):
    """A write failed because the file system at ``filename`` is full (``errno.ENOSPC``)."""

    def __init__(self, path: str | Path | None, detail: str = ""):
        super().__init__(errno.ENOSPC, f"no space left on device{f' ({detail})' if detail else ''}",
                         str(path) if path else None)

    def __reduce__(self):  # crosses Ray as itself
        return type(self), (self.filename, self.strerror.partition(" (")[2].rstrip(")"))


def disk_full(exc: BaseException, paths: tuple[str | Path, ...] = ()) -> NoSpaceError | None:
    """``exc`` as a :class:`NoSpaceError` when a full disk caused it, else None.

    Recognised anywhere in its chain of causes: an ``OSError`` with ``ENOSPC`` or ``EDQUOT``,
    SQLite's "database or disk is full", or the words "No space left on device" (pyarrow's
    message). Errors that hide the cause (torch's "file write failed") count when one of
    ``paths`` has less than ``LOW_SPACE_BYTES`` free. The path named is the error's own, else
    the one of ``paths`` with the least free space.
    """
    found, seen, e = None, set(), exc
    while e is not None and id(e) not in seen and found is None:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, NoSpaceError):
            found = e
        elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            found = NoSpaceError(e.filename)
        elif "database or disk is full" in text or "No space left on device" in text:
            found = NoSpaceError(getattr(e, "filename", None), text.splitlines()[0][:200] if text else "")
        e = e.__cause__ or e.__context__
    free = {}
    for path in paths:
        try:
            free[str(path)] = shutil.disk_usage(path).free
        except OSError:
            continue
    fullest = min(free, key=free.get) if free else None
    if found is None and fullest is not None and free[fullest] < LOW_SPACE_BYTES:
        return NoSpaceError(fullest, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    if found is not None and found.filename is None and fullest is not None:
        return NoSpaceError(fullest, found.strerror.partition(" (")[2].rstrip(")"))
    return found
