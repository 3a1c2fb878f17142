"""What a GPU check runs on: the Python modules it needs, and the machine.

The GPU machine may be bare (no network, no virtual environment): ``prepare_modules`` finds what is missing,
installs the missing optional ones from wheels carried in ``.whl/`` (``bash run.sh gpu-wheels`` downloads them
beforehand) into a folder of their own put first on the path of this process and of every process it starts,
and says where each module came from. Nothing is fetched from a network. The data of the training part are
written straight into the project's HDF5 cache format, so nibabel, SimpleITK and pylidc are not needed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

#: modules every part needs (importable name -> what for)
REQUIRED = {"torch": "everything", "numpy": "everything", "scipy": "the data pipeline", "h5py": "the HDF5 cache",
            "skimage": "augmentation", "matplotlib": "the learning curve", "einops": "the networks",
            "tqdm": "progress bars", "pytest": "the CUDA tests"}
#: modules one part needs; without them that part says so and the others run
OPTIONAL = {"monai": "the benchmark against MONAI's AHNet (bench workers import it)"}
#: the wheel file name prefix of each optional module
WHEEL_NAMES = {"monai": "monai-"}
WHEEL_DIR = ".whl"


class CheckError(ValueError):
    """A GPU check that cannot start (one sentence)."""


def _version(name: str) -> str | None:
    """The module's version when it imports, else None."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        mod = importlib.import_module(name)
    except Exception:       # a broken install counts as missing
        return None
    return str(getattr(mod, "__version__", "?"))


def _unpack(wheels: list[Path], site: Path) -> str:
    """pip install --no-index --no-deps --target site (a pure-Python wheel is a zip archive: unpacked directly
    where this Python has no pip)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site),
           *map(str, wheels)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if p.returncode == 0:
            return "pip"
    except (OSError, subprocess.SubprocessError):
        pass
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    return "unzip"


def use_site(site: Path, root: Path) -> None:
    """Put ``site`` and the repository first on this process's path and on PYTHONPATH for its children."""
    for p in (str(root), str(site)):
        if p not in sys.path:
            sys.path.insert(0, p)
    parts = [str(site), str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    importlib.invalidate_caches()


def prepare_modules(root: Path, site: Path) -> dict:
    """{module: {"version", "source", "for"}}; missing optional modules are installed from root/.whl when a
    wheel is there. Raises CheckError when a required module is missing."""
    use_site(site, root)
    missing = [m for m in REQUIRED if _version(m) is None]
    if missing:
        raise CheckError(f"this Python ({sys.executable}) lacks {', '.join(missing)}, which every part needs; "
                         f"install them (or run where they are).")
    out = {m: {"version": _version(m), "source": "present", "for": why} for m, why in REQUIRED.items()}
    for m, why in OPTIONAL.items():
        v, source = _version(m), "present"
        if v is not None and str(getattr(sys.modules.get(m), "__file__", "")).startswith(str(site)):
            source = f"present in {site} (installed there from {WHEEL_DIR}/ by an earlier check)"
        if v is None:
            wheels = sorted((root / WHEEL_DIR).glob(f"{WHEEL_NAMES[m]}*.whl"))
            if wheels:
                site.mkdir(parents=True, exist_ok=True)
                how = _unpack(wheels, site)
                importlib.invalidate_caches()
                v = _version(m)
                source = (f"installed from {WHEEL_DIR}/{wheels[-1].name} ({how})" if v else
                          f"not importable from {WHEEL_DIR}/{wheels[-1].name} ({how})")
            else:
                source = f"missing (no {WHEEL_DIR}/{WHEEL_NAMES[m]}*.whl: bash run.sh gpu-wheels)"
        out[m] = {"version": v, "source": source, "for": why}
    return out


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        p = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [r.split(", ") for r in p.stdout.strip().splitlines() if r.strip()]
    return {"nvidia_smi": [dict(zip(("name", "driver", "memory"), r)) for r in rows]} if rows else {}


def machine() -> dict:
    """The machine: Python, torch, CUDA, cuDNN, the GPUs (name, memory, capability, driver), CPUs, the commit."""
    from ahnet.train.config import environment_info
    info = environment_info()
    info.update(processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                cuda_available=torch.cuda.is_available(), gpu_count=torch.cuda.device_count())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
        info.update(_nvidia_smi())
        drivers = {g.get("driver") for g in info.get("nvidia_smi", [])}
        info["driver"] = drivers.pop() if len(drivers) == 1 else sorted(d for d in drivers if d) or None
    return info
