"""Files that are never seen half-written: every write goes to a temporary name in the same
folder, is flushed to disk, and is renamed into place (atomic on POSIX)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMPORARY_MARK = ".tmp-"
"""Part of every temporary name: a file or folder with it is debris of an interrupted write."""


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync it and rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (non-JSON values by ``str``)."""
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def temporary_folder(parent: Path, name: str) -> Path:
    """A new empty folder in ``parent`` to build ``name`` in before :func:`replace_folder`."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}{TEMPORARY_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def replace_folder(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an old ``dst``; ``dst`` is never seen half-written."""
    try:
        os.replace(src, dst)  # atomic when dst is absent (or an empty folder)
        return
    except OSError:
        if not dst.exists():
            raise
    old = dst.with_name(f".{dst.name}.old{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def remove_debris(folder: Path) -> list[Path]:
    """Delete temporary files and folders left in ``folder`` by interrupted writes of processes
    that are no longer running; return what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        if not (item.name.startswith(".") and TEMPORARY_MARK in item.name):
            continue
        pid = _writer_pid(item.name)
        if pid is not None and _alive(pid):
            continue
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def _writer_pid(name: str) -> int | None:
    tail = name.split(TEMPORARY_MARK, 1)[1]
    head = tail.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
