"""Atomic file writes: a reader (or a crash) sees the old file or the complete new one, never half a file.

    with atomic_path("runs/x/log.csv") as tmp:   # write to tmp however you like
        write_csv(tmp)
    # renamed over the target on success; removed on error

The temporary file sits in the target's folder (so the rename is atomic) and is named `.<name>.tmp-<pid><suffix>`,
keeping the suffix so format-sniffing writers (nibabel, matplotlib) still work.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
    name = path.name
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


@contextmanager
def atomic_path(path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds.

    durable: also fsync the file and its folder (checkpoints and caches: survive a power cut, not just a kill).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{_suffix(path)}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text: str) -> Path:
    """Write UTF-8 text atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
