"""How many voxels a command may take in, decided from headers before any voxel is read.

A command holds a few arrays per voxel of a scan (the float32 image, the probability map and its accumulators,
masks): ``BYTES_PER_VOXEL`` says how many bytes each command holds at its peak per voxel of the scan it works on,
as measured (paper_notes/data.md, "Reliability"). ``scan_limit(command)`` turns that and the memory available
now (``memory_available``: /proc/meminfo's MemAvailable, lowered by a cgroup's memory.max and the address-space
limit where they are smaller) into a :class:`ScanLimit`, the most voxels the command may hold; a flag
(``--max-scan-voxels N``) replaces it. ``ScanLimit.check`` refuses a header over it in one sentence that states
the number and the flag, before the voxels are read.

The server uses the same object for a request: ``ScanLimit.check_request(shape, dtype, nbytes)`` refuses a
declared tensor over the limit (or whose byte count disagrees with its shape) before it is decoded.
"""
from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ahnet.data.checks import DataError
from ahnet.data.header import ScanHeader

#: peak bytes a command holds per voxel of the scan in hand (measured, paper_notes/data.md "Reliability"):
#: read = the readers alone (file dtype, the transposed copy, float32); predict and client = reading, scaling,
#: the window accumulators, the probability map and masks; cache = reading, the mask, resampling, the HDF5
#: write; evaluate_held = what evaluate keeps per voxel of every scan of the split (geometry, scaled image,
#: label) and evaluate_per_run = one probability map per run on top.
BYTES_PER_VOXEL = {"read": 12, "predict": 24, "client": 24, "cache": 24, "evaluate_held": 12,
                   "evaluate_per_run": 4}
FLAG = "--max-scan-voxels"
_GB = 1e9


class ScanTooLarge(DataError):
    """A scan (or request) with more voxels than the command may hold; the sentence states the limit."""


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: str = "/sys/fs/cgroup") -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None when unlimited or unknown."""
    try:
        rel = next((ln.split(":", 2)[2].strip() for ln in Path("/proc/self/cgroup").read_text().splitlines()
                    if ln.startswith("0::")), "/")
        folder = Path(root) / rel.lstrip("/")
        cap = (folder / "memory.max").read_text().strip()
        if cap == "max":
            return None
        return max(0, int(cap) - int((folder / "memory.current").read_text().strip()))
    except (OSError, ValueError, StopIteration):
        return None


def _address_room() -> int | None:
    """RLIMIT_AS minus this process's virtual size, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        vm = 0
    return max(0, soft - vm)


def memory_available() -> tuple[int | None, str]:
    """(bytes this process may still allocate, where that number comes from): the smallest of MemAvailable, the
    cgroup's room and the address-space limit's room; (None, "unknown") where none can be read."""
    found = [(v, name) for v, name in ((_meminfo_available(), "MemAvailable"), (_cgroup_room(), "cgroup memory.max"),
                                       (_address_room(), "address-space limit")) if v is not None]
    if not found:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical memory"
        except (ValueError, OSError, AttributeError):
            return None, "unknown"
    return min(found)


@dataclass(frozen=True)
class ScanLimit:
    """The most voxels a command holds at once (``max_voxels``; None = no limit known) and why: ``command`` and
    its ``bytes_per_voxel``, ``available`` bytes and their ``source``, or the ``flag`` that set it."""
    max_voxels: int | None
    command: str
    bytes_per_voxel: float
    available: int | None = None
    source: str = ""
    set_by_flag: bool = False
    flag: str = FLAG

    def reason(self, voxels: int) -> str:
        """Why ``voxels`` is too many, in words (part of the one-line error)."""
        if self.set_by_flag:
            return f"more than {self.flag} {self.max_voxels}"
        need = voxels * self.bytes_per_voxel
        return (f"{self.command} holds about {self.bytes_per_voxel:g} B per voxel ({need / _GB:.1f} GB), more than "
                f"the {self.available / _GB:.1f} GB of memory available ({self.source}), so it is refused before "
                f"its voxels are read; free memory, or pass {self.flag} {voxels} to try anyway")

    def check(self, header: ScanHeader, voxels: int | None = None, what: str | None = None) -> None:
        """ScanTooLarge when the scan of ``header`` (or ``voxels`` held for it, e.g. a whole split) is over the
        limit; ``what`` names the thing held (default: the header's file and size)."""
        n = header.voxels if voxels is None else int(voxels)
        if self.max_voxels is None or n <= self.max_voxels:
            return
        what = what or f"{header.path}: the header says {header.describe()} ({n:.3g} voxels)"
        raise ScanTooLarge(f"{what}; {self.reason(n)}.")

    def check_request(self, shape: Sequence[int], dtype, nbytes: int | None = None, what: str = "request") -> None:
        """For a server: ScanTooLarge (one sentence) when a declared tensor of ``shape`` and ``dtype`` has more
        voxels than the limit, or DataError when its ``nbytes`` (the payload's length, when known) differs from
        shape x itemsize; call it on the request's metadata, before its data are decoded."""
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise DataError(f"{what}: shape {shape} has a negative size.")
        n, item = math.prod(shape), np.dtype(dtype).itemsize
        if nbytes is not None and int(nbytes) != n * item:
            raise DataError(f"{what}: {nbytes} bytes of data for shape {shape} {np.dtype(dtype).name}, which needs "
                            f"{n * item}.")
        if self.max_voxels is not None and n > self.max_voxels:
            raise ScanTooLarge(f"{what}: shape {shape} ({n:.3g} voxels); {self.reason(n)}.")


def scan_limit(command: str, override: int | None = None, bytes_per_voxel: float | None = None,
               available: tuple[int | None, str] | None = None, flag: str = FLAG) -> ScanLimit:
    """The ScanLimit of ``command`` (a key of BYTES_PER_VOXEL, or any name with ``bytes_per_voxel``):
    ``override`` voxels when given (the flag), else the available memory (``available``: (bytes, source),
    default memory_available()) over its bytes per voxel."""
    bpv = float(bytes_per_voxel if bytes_per_voxel is not None else BYTES_PER_VOXEL[command])
    if override is not None:
        return ScanLimit(int(override), command, bpv, set_by_flag=True, flag=flag)
    room, source = available if available is not None else memory_available()
    return ScanLimit(None if room is None else int(room // bpv), command, bpv, room, source, flag=flag)


def check_headers(headers: Sequence[ScanHeader], limit: ScanLimit) -> None:
    """Each header against ``limit`` (a command that holds one scan at a time)."""
    for h in headers:
        limit.check(h)


def add_limit_argument(parser, what: str = "one scan") -> None:
    """The ``--max-scan-voxels N`` option (an integer >= 1; default: from the memory available)."""
    from ahnet import failures
    parser.add_argument(FLAG, type=failures.number(int, 1), default=None, metavar="N",
                        help=f"refuse input holding more than N voxels in {what} (read from the headers before any "
                             f"voxel is); default: the memory available now over this command's bytes per voxel")
