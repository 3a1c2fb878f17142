"""Atomic file writes: a reader (or a crash) sees the old file or the complete new one, never half a file.

    with atomic_path("runs/x/log.csv") as tmp:   # write to tmp however you like
        write_csv(tmp)
    # renamed over the target on success; removed on error

The temporary file sits in the target's folder (so the rename is atomic) and is named `.<name>.tmp-<pid>`, plus
the suffix for the formats whose writers pick the format by the name (nibabel, SimpleITK, matplotlib), so a
temporary never matches ``*.h5``, ``*.pt``, ``*.csv`` or ``*.json``; it is hidden (a leading dot) for the others.
A kill leaves such a file behind: ``remove_temps`` clears them (those of processes that are gone, or all of them
for the holder of the folder's lock).

``atomic_paths([a, b, ...])``: several files written to their temporaries first and renamed together at the end,
so an error while writing any of them (a full disk included) leaves every old file as it was.

A write that fails because the filesystem is full (or over quota) raises ``DiskFull``, an OSError whose one
sentence names the file and its folder and says the previous file is kept; its temporary is removed.

``folder_lock(folder)``: one writer per output folder (an advisory ``flock`` on ``<folder>/.ahnet.lock``); a
second writer gets ``FolderBusy`` naming the holder's pid; the kernel drops the lock of a killed process, so
the next writer takes over its lock file.
"""
from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: suffixes kept on temporary names: their writers choose the format by the file name
SNIFFED_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".png", ".svg", ".pdf")
_TEMP = re.compile(r"^\..+\.tmp-(\d+)(\.[A-Za-z0-9.]+)?$")
LOCK_NAME = ".ahnet.lock"
#: a failed write on a filesystem with less room than this left is taken for a full disk (torch's writer
#: reports one without an errno)
FULL_BELOW_BYTES = 1 << 20
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "errno = 28,")


class DiskFull(OSError):
    """A write that failed because its filesystem is full: one sentence naming the file (errno ENOSPC)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def free_bytes(folder) -> int | None:
    """Bytes this user may still write on the filesystem of ``folder`` (root: the reserved blocks too)."""
    try:
        st = os.statvfs(str(folder))
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def no_room(exc: BaseException, folder) -> bool:
    """True when ``exc`` (a failed write into ``folder``) means the filesystem is full: ENOSPC / EDQUOT anywhere
    in its chain, the words of that error in a library's message (HDF5, ITK), or a failed write (OSError,
    RuntimeError: torch's writer says only 'unexpected pos') with less than FULL_BELOW_BYTES left."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(seen) for w in _FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(folder)
    return isinstance(exc, (OSError, RuntimeError)) and free is not None and free < FULL_BELOW_BYTES


def disk_full(paths: list) -> DiskFull:
    """The DiskFull of a failed write of ``paths`` (one sentence: where, and that the old files are kept)."""
    names = ", ".join(p.name for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    free = free_bytes(paths[0].parent)
    left = "" if free is None else f", {free // 1024} KiB left"
    return DiskFull(f"no space left on the device of {paths[0].parent} (writing {names}{left}); the previous "
                    f"file(s) there are kept as they were and nothing half-written remains; free space and run again")


def fsync_dir(path: Path) -> None:
    """Flush a folder's entry list to disk (after a rename); a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SNIFFED_SUFFIXES if name.endswith(s)), "")


def temp_path(path) -> Path:
    """The temporary name of ``path`` for this process (see the module docstring)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{_suffix(path)}")


def is_temp(path) -> bool:
    """True for a temporary name written by atomic_path."""
    return _TEMP.match(Path(path).name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_temps(folder, recursive: bool = False, only_dead: bool = True) -> list:
    """Remove the temporary files that killed writes left in ``folder`` (and its subfolders with
    ``recursive``); ``only_dead``: only those whose writing process is gone (else every one but this
    process's own, for the holder of the folder's lock). Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in (folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*")):
        m = _TEMP.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or (only_dead and _alive(pid)):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _missing_folders(path: Path) -> list:
    """The folders above ``path`` that do not exist yet, outermost first."""
    created, p = [], path.absolute().parent
    while not p.exists() and p != p.parent:
        created.insert(0, p)
        p = p.parent
    return created


@contextmanager
def atomic_paths(paths, durable: bool = False) -> Iterator[list]:
    """Yield temporary paths beside ``paths`` (one each); when the block succeeds, rename every one over its
    target (all the writing is done by then). On an error every temporary is removed, and the folders this
    call created are removed again when empty; a full disk becomes DiskFull naming the files.

    durable: also fsync the files and their folders (checkpoints and caches: survive a power cut, not a kill).
    """
    paths = [Path(p) for p in paths]
    created = sorted({f for p in paths for f in _missing_folders(p)}, key=lambda f: len(f.parts))
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmps = [temp_path(p) for p in paths]
    ok = False
    try:
        yield tmps
        if durable:
            for tmp in tmps:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
        for tmp, p in zip(tmps, paths):
            os.replace(tmp, p)
        if durable:
            for folder in {p.parent for p in paths}:
                fsync_dir(folder)
        ok = True
    except Exception as e:
        if paths and no_room(e, paths[0].parent):
            raise disk_full(paths) from None
        raise
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()
        if not ok:
            _remove_created(created)


@contextmanager
def atomic_path(path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds (atomic_paths of one
    file: removed on error, DiskFull on a full disk).

    durable: also fsync the file and its folder (checkpoints and caches: survive a power cut, not just a kill).
    """
    with atomic_paths([path], durable) as (tmp,):
        yield tmp


def write_text_atomic(path, text: str) -> Path:
    """Write UTF-8 text atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ------------------------------------------------------------------------------------------------ locks
class FolderBusy(ValueError):
    """Another live process holds the folder's lock (one sentence naming it)."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return f"pid {int(text.split()[0])}"
    except (OSError, ValueError, IndexError):
        return "another process"


def _remove_created(created: list) -> None:
    """Remove the folders a failed write or lock created (``created``: outermost first) when still empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


@contextmanager
def folder_lock(folder, what: str = "output folder") -> Iterator[Path]:
    """Hold the one-writer lock of ``folder`` (created if missing) for the block; FolderBusy when a live
    process holds it. On an error inside the block, the folders this call created are removed again when
    they are still empty (bad input leaves nothing behind)."""
    import fcntl

    folder = Path(folder)
    created = _missing_folders(folder / LOCK_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise FolderBusy(f"{what} {folder} is in use by {holder} (a second writer would mix their files); "
                             f"wait for it to finish or choose another folder") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:    # not a lock file its last holder removed
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    ok = False
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError as e:
            if no_room(e, folder):
                raise disk_full([path]) from None
            raise
        yield path
        ok = True
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if not ok:
            _remove_created(created)
