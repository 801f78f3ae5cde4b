"""Atomic writes: the destination holds the old bytes or the new, and no temporary file is left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ftune import atomic_files
from ftune.atomic_files import publish_dir, write_bytes_atomic, write_text_atomic


def test_write_creates_the_directory_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "spend.json"
    assert write_bytes_atomic(path, b"one") == path
    assert path.read_bytes() == b"one"
    write_text_atomic(path, "twö")
    assert path.read_text(encoding="utf-8") == "twö"
    assert os.listdir(path.parent) == ["spend.json"]


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "spend.json"
    path.write_bytes(b"old")

    def fail_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic_files.os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["spend.json"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "spend.json"
    path.write_bytes(b"old")

    def fail_replace(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_files.os, "replace", fail_replace)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["spend.json"]


def test_publish_dir_swaps_a_stale_directory_for_the_new_build(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale.txt").write_text("old")

    def build(tmp: Path) -> None:
        (tmp / "weights").write_text("new")

    publish_dir(build, final, is_current=lambda path: (path / "weights").is_file())
    assert sorted(os.listdir(final)) == ["weights"]
    assert os.listdir(tmp_path) == ["model"]


def test_publish_dir_keeps_a_copy_another_process_published_first(tmp_path):
    final = tmp_path / "model"

    def build(tmp: Path) -> None:
        final.mkdir()
        (final / "weights").write_text("theirs")  # the other process wins while this one builds
        (tmp / "weights").write_text("mine")

    publish_dir(build, final, is_current=lambda path: (path / "weights").is_file())
    assert (final / "weights").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["model"]


def test_publish_dir_leaves_nothing_behind_when_the_build_fails(tmp_path):
    final = tmp_path / "model"

    def build(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        publish_dir(build, final, is_current=lambda path: False)
    assert os.listdir(tmp_path) == []
