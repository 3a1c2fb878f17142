"""Checkpoints: atomic save, safe load (``torch.load(weights_only=True)``), RNG state capture and restore.

A checkpoint is a dict of tensors and plain values only, with keys
``model`` (state dict), ``model_name``, ``model_kwargs``, ``optimizer``, ``scaler``, ``scheduler``, ``epoch``,
``step``, ``rng``, ``config``, ``metrics``. Files that are not such a dict (a pickle carrying code, a truncated
or random file, a bare tensor) are refused with a ``CheckpointError`` that says so in one sentence.

Integrity: ``save_checkpoint`` adds ``sha256``, a SHA-256 digest of the whole content (every tensor's dtype, shape
and bytes, every plain value, in order), and ``load_checkpoint`` recomputes it: a file whose bytes were flipped
or lost at rest is a ``CorruptCheckpoint`` naming it, never weights read wrong (torch's zip reader checks no CRC
of the tensor data). A file without the key (written before it existed, or by another program) loads as before.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ahnet.atomic import atomic_path

__all__ = [
    "CheckpointError", "CorruptCheckpoint", "REQUIRED_KEYS", "DIGEST_KEY", "content_digest", "check_digest",
    "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state",
]

#: keys every training checkpoint of this project carries (the rest are optional for foreign files).
REQUIRED_KEYS = ("model", "model_name", "model_kwargs")
#: the key of the content digest (module docstring)
DIGEST_KEY = "sha256"


class CheckpointError(ValueError):
    """A file that is not a checkpoint this project can load."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose content no longer matches the digest written with it."""


def _feed(h, value) -> None:
    """Feed one value of a checkpoint into the hash ``h``: tensors by dtype, shape and bytes; dicts, lists and
    tuples by their items in order; anything else by its type name and repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for k, v in value.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)};".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def content_digest(obj: dict) -> str:
    """SHA-256 (hex) of a checkpoint dict's content, its DIGEST_KEY left out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def check_digest(obj: dict, path) -> None:
    """CorruptCheckpoint naming ``path`` when ``obj`` carries a digest its content no longer matches (or a digest
    under a damaged key name)."""
    want = obj.get(DIGEST_KEY)
    if want is None:
        if not any(_is_digest(v) for v in obj.values()):
            return                                       # no digest: a file written before there was one
        want = ""
    if not isinstance(want, str) or content_digest(obj) != want:
        raise CorruptCheckpoint(f"{path} is corrupt: its content no longer matches the SHA-256 digest written with "
                                f"it (bytes flipped or lost on disk); restore it from a copy or train it again.")


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` with its content digest (DIGEST_KEY) to ``path`` atomically: a temporary file in the same
    folder, fsync, then os.replace.

    A reader (or a crash) sees either the old file or the new one, never half a file; a full disk raises
    ahnet.atomic.DiskFull and leaves the old file. Returns the path.
    """
    path = Path(path)
    obj = {**{k: v for k, v in obj.items() if k != DIGEST_KEY}, DIGEST_KEY: content_digest(obj)}
    with atomic_path(path, durable=True) as tmp:
        torch.save(obj, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    required_keys: Iterable[str] = REQUIRED_KEYS) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check it is a dict with ``required_keys``
    whose content matches its digest.

    Raises CheckpointError (a ValueError) naming the file and what is wrong: missing, not a torch file,
    truncated, holding code or objects other than tensors and plain values, corrupt (CorruptCheckpoint), or
    missing keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .pt file written by ahnet.train).")
    try:
        with warnings.catch_warnings():   # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a safe checkpoint: it holds objects other than tensors and plain values, which "
            f"weights_only loading refuses ({first[:160]}).") from None
    except Exception as e:  # noqa: BLE001 - a damaged file makes torch raise anything (struct.error, MemoryError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (truncated, corrupt or another format: "
            f"{first[:160]}).") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict with keys "
                              f"{list(required_keys)}.")
    check_digest(obj, path)
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is a dict but not a training checkpoint: it lacks the keys {missing}.")
    return obj


# ----------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """The torch (CPU and CUDA), numpy-global and python ``random`` states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what ``capture_rng_state`` captured (CUDA states only when CUDA is available)."""
    try:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
        npd = state["numpy"]
        np.random.set_state((npd["kind"], npd["keys"].cpu().numpy().astype(np.uint32), int(npd["pos"]),
                             int(npd["has_gauss"]), float(npd["cached_gaussian"])))
        pyd = state["python"]
        random.setstate((int(pyd["version"]), tuple(int(v) for v in pyd["state"].tolist()), pyd["gauss_next"]))
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's rng entry is not one written by capture_rng_state ({e}).") \
            from None
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.to(torch.uint8).cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
