"""Write a file or publish a directory so that a reader sees the old version or the new one, never a part.

Everything is written to a hidden temporary sibling first (the same directory, so the rename stays on
one filesystem and is atomic), flushed to disk, then renamed over the destination. A failure at any
point removes the temporary copy and leaves the destination as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically, creating its directory if needed; returns the path.

    The bytes are fsynced before the rename and the directory after it, so a crash leaves the old file
    or the new one, not an empty file the rename raced ahead of.
    """
    return write_atomic(path, lambda out: out.write(data))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write_bytes_atomic`` for content that ``write`` streams into the open temporary file (a download)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:  # honours the umask, unlike mkstemp's owner-only mode
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically (see ``write_bytes_atomic``); returns the path."""
    return write_bytes_atomic(path, text.encode(encoding))


def publish_dir(build: Callable[[Path], object], final: Path, *, is_current: Callable[[Path], bool]) -> None:
    """Run ``build(tmp_dir)`` next to ``final`` and rename the result into place.

    Several processes may publish the same directory at once. If ``is_current(final)`` holds once the
    build is done, another process published first and its copy is kept. Otherwise an existing
    ``final`` (stale, incomplete, or a forced rebuild) is moved aside and deleted after the swap.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the published directory should be readable like any other
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
    try:
        build(tmp)
        if is_current(final):
            return
        if final.exists():
            try:
                os.rename(final, old)  # rename cannot replace a non-empty directory
            except FileNotFoundError:
                pass  # another process moved it aside first
        try:
            os.rename(tmp, final)  # atomic on POSIX
        except OSError:
            if not is_current(final):  # lost a race to a process that published a good copy: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
