"""What a bench run measures: the lever sets (ours, and the part MONAI can take), the precisions the device
has, and the list of worker specs."""
from __future__ import annotations

import json

import torch

from ahnet.precision import cpu_native_bf16


#: the levers of ours that are on by default, each switched back for a row that measures it alone: the depth guard
#: in float32 (the first guard) or off, the fused BN-ReLU-conv units off, the z-pooling as max_pool3d
OURS_OFF = ("guard=float32", "guard=off", "fused=off", "zpool=maxpool")


def parse_levers(items) -> list:
    """['channels_last', 'checkpoint=decoder', 'channels_last+checkpoint=all', 'compile'] -> list of dicts."""
    out = []
    for item in items:
        lv = {}
        for part in item.split("+"):
            if part == "channels_last":
                lv["channels_last"] = True
            elif part == "compile":
                lv["compile"] = True
            elif part.startswith("checkpoint="):
                lv["checkpoint"] = part.split("=", 1)[1]
            elif part in OURS_OFF:
                key, value = part.split("=", 1)
                lv[key] = value
            else:
                raise ValueError(f"unknown lever {part!r}; expected channels_last, compile, checkpoint=MODE or one of "
                                 f"ours switched: {', '.join(OURS_OFF)} (joined with +)")
        out.append(lv)
    return out


def lever_name(lv: dict) -> str:
    parts = [k if v is True else f"{k}={v}" for k, v in sorted(lv.items())]
    return "+".join(parts) or "-"


PEER_LEVERS = ("channels_last", "compile")   # levers that apply to any nn.Module, MONAI's AHNet included


def peer_levers(lv: dict) -> dict:
    """The part of a lever set that MONAI's AHNet can take too (its like-for-like comparison)."""
    return {k: v for k, v in lv.items() if k in PEER_LEVERS}


def amp_dtypes(args, device: torch.device) -> list:
    """fp32, plus AMP where the device has it: float16 on CUDA, bfloat16 on a CPU that computes it natively
    (--cpu-bf16 forces it elsewhere); --no-amp: fp32 only."""
    if args.no_amp:
        return ["fp32"]
    if device.type == "cuda":
        return ["fp32", "amp"]
    return ["fp32", "bf16"] if (args.cpu_bf16 or cpu_native_bf16()) else ["fp32"]


def build_plan(args, device: torch.device) -> list:
    dtypes = amp_dtypes(args, device)
    base = dict(device=str(device), pfn=args.pfn, patch=list(args.patch), batch=args.batch, warmup=args.warmup,
                repeats=args.repeats)
    mbase = dict(base, op_profile=True) if args.op_profile else base
    plan, seen = [], set()

    def add(kind, spec):
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            plan.append((kind, spec))

    for mode in [] if args.skip_model else args.modes:
        for dtype in dtypes:
            for impl in ("ours", "monai"):   # interleaved, so background load hits both alike
                add("model", dict(mbase, kind="model", impl=impl, mode=mode, dtype=dtype, levers={}))
    for lv in [] if args.skip_model else parse_levers(args.levers):
        for dtype in dtypes:
            add("model", dict(mbase, kind="model", impl="ours", mode=args.lever_mode, dtype=dtype, levers=lv))
            if peer_levers(lv):
                add("model", dict(mbase, kind="model", impl="monai", mode=args.lever_mode, dtype=dtype,
                                  levers=peer_levers(lv)))
    if not args.skip_infer:
        ibase = dict(device=str(device), pfn=args.pfn, volume=list(args.volume), window=list(args.window or args.patch),
                     overlap=args.overlap, sw_batch=args.sw_batch, repeats=1, kind="infer")
        infer_levers = args.infer_levers
        if infer_levers is None:
            infer_levers = ["channels_last"] + [f"channels_last+dtype={d}" for d in dtypes if d != "fp32"]
        for mode in args.infer_modes:
            for lv in [{}] + parse_infer_levers(infer_levers):
                dtype = lv.pop("dtype", "fp32")
                for impl in ("ours", "monai"):
                    add("infer", dict(ibase, impl=impl, mode=mode, dtype=dtype, levers=lv))
    if not args.skip_2d:
        for dtype in dtypes:
            add("mcgcn", dict(device=str(device), kind="mcgcn", batch=args.batch_2d, size=list(args.size_2d),
                              dtype=dtype, warmup=args.warmup, repeats=args.repeats))
    if not args.skip_data:
        add("data", dict(kind="data", cases=3, case_shape=[max(2 * args.patch[0], 48), 256, 256],
                         patch=list(args.patch), samples=args.data_samples, workers=args.data_workers))
    return plan



def parse_infer_levers(items) -> list:
    """['channels_last', 'dtype=bf16', 'channels_last+dtype=amp'] -> list of dicts (dtype: fp32 | amp | bf16)."""
    out = []
    for item in items:
        lv = {}
        for part in item.split("+"):
            if part.startswith("dtype="):
                lv["dtype"] = part.split("=", 1)[1]
            elif part == "channels_last":
                lv["channels_last"] = True
            else:
                raise ValueError(f"unknown inference lever {part!r}; expected channels_last or dtype=amp|bf16")
        out.append(lv)
    return out
