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
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

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
def atomic_write(path: str | Path, mode: str = "w", *, permissions: int = 0o644, **open_kwargs) -> Iterator[IO]:
    """Open a hidden temporary file next to ``path``; on a clean exit flush, fsync and rename it
    over ``path`` (then fsync the directory); on an exception remove it and leave ``path`` as it
    was. ``permissions``: the new file's mode (e.g. 0o600 for secrets; the umask still applies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str, *, permissions: int = 0o644) -> Path:
    """``path.write_text(text)``, atomically."""
    with atomic_write(path, permissions=permissions) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON (with a final newline), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
