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

#: peak bytes a command holds per voxel of the scan in hand, measured as the slope of peak RSS over two scan
#: sizes (paper_notes/data.md "Reliability"): read = the readers alone (5.99 measured: file dtype, the transposed
#: copy, float32); predict = reading, scaling, the window accumulators, the probability map, candidates and masks
#: (39.8); client = predict's pipeline with the windows answered remotely (taken as predict's); cache = reading,
#: the mask, resampling, the file made in memory (18.1). Evaluate holds every scan of the split at once:
#: evaluate_held per voxel of each (its geometry and scaled image in float32, its label in int32), evaluate_per_run
#: per run held (a probability map each; the evaluate command holds one run's at a time), and evaluate_in_hand on
#: top for the scan being predicted (53.6 measured for one scan and one run = 16 + 4 + the rest).
BYTES_PER_VOXEL = {"read": 8, "predict": 40, "client": 40, "cache": 20, "evaluate_held": 16, "evaluate_per_run": 4,
                   "evaluate_in_hand": 36}
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
    """What a command may hold: ``flag_voxels`` when the flag set it, else the ``available`` bytes of memory (None
    = unknown: no limit) from ``source``, at ``bytes_per_voxel`` of what it holds (``command`` names it)."""
    command: str
    bytes_per_voxel: float
    available: int | None = None
    source: str = ""
    flag_voxels: int | None = None
    flag: str = FLAG

    @property
    def max_voxels(self) -> int | None:
        """The most voxels held at once: the flag's, else the memory available over the bytes per voxel."""
        if self.flag_voxels is not None:
            return self.flag_voxels
        return None if self.available is None else int(self.available // self.bytes_per_voxel)

    def refusal(self, voxels: int, need: float | None = None, how: str | None = None) -> str | None:
        """Why holding ``voxels`` (needing ``need`` bytes, default voxels x bytes_per_voxel; ``how`` says how
        they add up) is refused, in words; None when it fits."""
        if self.flag_voxels is not None:
            return None if voxels <= self.flag_voxels else f"more than {self.flag} {self.flag_voxels}"
        need = voxels * self.bytes_per_voxel if need is None else need
        if self.available is None or need <= self.available:
            return None
        return (f"{self.command} holds about {how or f'{self.bytes_per_voxel:g} B per voxel'} ({need / _GB:.1f} GB), "
                f"more than the {self.available / _GB:.1f} GB of memory available ({self.source}), so it is refused "
                f"before its voxels are read; free memory, or pass {self.flag} {voxels} to try anyway")

    def check(self, header: ScanHeader, voxels: int | None = None, what: str | None = None,
              need: float | None = None, how: str | None = None) -> None:
        """ScanTooLarge when the scan of ``header`` (or ``voxels`` held for it, e.g. a whole split, needing
        ``need`` bytes as ``how`` says) is over the limit; ``what`` names the thing held (default: the header's
        file and size)."""
        n = header.voxels if voxels is None else int(voxels)
        why = self.refusal(n, need, how)
        if why is not None:
            what = what or f"{header.path}: the header says {header.describe()} ({n:.3g} voxels)"
            raise ScanTooLarge(f"{what}; {why}.")

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
        why = self.refusal(n)
        if why is not None:
            raise ScanTooLarge(f"{what}: shape {shape} ({n:.3g} voxels); {why}.")


def scan_limit(command: str, override: int | None = None, bytes_per_voxel: float | None = None,
               available: tuple[int | None, str] | None = None, flag: str = FLAG) -> ScanLimit:
    """The ScanLimit of ``command`` (a key of BYTES_PER_VOXEL, or any name with ``bytes_per_voxel``):
    ``override`` voxels when given (the flag), else the available memory (``available``: (bytes, source),
    default memory_available()) at its bytes per voxel."""
    bpv = float(bytes_per_voxel if bytes_per_voxel is not None else BYTES_PER_VOXEL[command])
    if override is not None:
        return ScanLimit(command, bpv, flag_voxels=int(override), flag=flag)
    room, source = available if available is not None else memory_available()
    return ScanLimit(command, bpv, room, source, flag=flag)


def add_limit_argument(parser, what: str = "one scan") -> None:
    """The ``--max-scan-voxels N`` option (an integer >= 1; default: from the memory available)."""
    from ahnet import failures
    parser.add_argument(FLAG, type=failures.number(int, 1), default=None, metavar="N",
                        help=f"refuse input holding more than N voxels in {what} (read from the headers before any "
                             f"voxel is); default: the memory available now over this command's bytes per voxel")
