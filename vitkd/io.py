"""Atomic file writes: every output is written to a temporary name, then renamed into place.

A crash therefore never leaves a half-written checkpoint, shard, selection or metrics file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: outputs get the usual permissions, not mkstemp's owner-only 0600


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; it replaces ``path`` (a directory) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "numel"):  # a tensor (torch is not imported here, so light tools start fast)
        return x.item() if x.numel() == 1 else x.tolist()
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def build_once(path: str | os.PathLike, build: Callable[[], Any], done: str | os.PathLike | None = None) -> None:
    """Run ``build`` (which writes the directory or file ``path``) unless ``done`` (default: ``path``; e.g.
    the file a build writes last) exists, so a copy left incomplete is built again. Runs started together
    (a demo's parallel jobs, two users' runs) take a lock next to ``path``: the first builds, the others
    wait and then find it, instead of writing the same files again and renaming them under a reader.
    filelock: an OS lock, released if its holder dies."""
    path = Path(path)
    done = Path(done) if done is not None else path
    if done.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        if not done.exists():
            build()
