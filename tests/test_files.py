"""Atomic writes: a reader sees the old file or the whole new one; a failed write leaves no trace."""

import pytest

from configs.files import atomic_write, write_text_atomic


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"complete")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_private_write_is_owner_only_and_fsyncs_into_place(tmp_path):
    path = write_text_atomic(tmp_path / "token", "secret", permissions=0o600)
    assert path.read_text() == "secret"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]
