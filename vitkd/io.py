"""Durable, atomic file writes: every output is written to a temporary name, flushed to the disk
(``fsync``), renamed into place, and its folder is flushed too, so the rename itself survives a power cut.

A crash therefore never leaves a half-written checkpoint, shard, selection or metrics file, and a full
disk ends the run with one line naming the file and the free space, with the previous file kept.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from vitkd.errors import VitkdInputError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: outputs get the usual permissions, not mkstemp's owner-only 0600


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(VitkdInputError):
    """The disk filled while writing an output; the file it would have replaced is kept."""


def disk_full(exn: BaseException | None) -> bool:
    """Whether ``exn`` or an exception behind it (torch and tarfile wrap the OS error) is a full disk or quota."""
    seen = set()
    while exn is not None and id(exn) not in seen:
        seen.add(id(exn))
        if isinstance(exn, OSError) and exn.errno in DISK_FULL:
            return True
        exn = exn.__cause__ or exn.__context__
    return False


def _free(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    return ""


def _disk_full_error(path: Path, existed: bool) -> DiskFullError:
    kept = f"the previous {path.name} is kept" if existed else "nothing was replaced"
    return DiskFullError(
        f"no space left on the device writing {path} ({_free(path.parent)} free there): "
        f"free some space or pass a --run_dir on another disk; {kept}"
    )


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents to the disk (a folder: the names it holds, i.e. renames into it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it is fsynced, renamed onto ``path``,
    and the folder is fsynced. A full disk raises ``DiskFullError`` (one line: the path, the free space)
    and leaves the previous ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except Exception as exn:
        if disk_full(exn) and not isinstance(exn, DiskFullError):
            raise _disk_full_error(path, existed) from exn
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; it replaces ``path`` (a directory) only if the block succeeds, after
    every file in it and the folders are fsynced. A full disk raises ``DiskFullError``; ``path`` is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(root)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_path(path.parent)
    except Exception as exn:
        if disk_full(exn) and not isinstance(exn, DiskFullError):
            raise _disk_full_error(path, existed) from exn
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


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
