"""The network of a run: built from the configuration (from scratch, ImageNet weights, or the 2D -> 3D transfer
with its exactness check), or rebuilt from the checkpoint a run resumes from; then placed on its device."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ahnet import paths
from ahnet.checkpoint import CheckpointError
from ahnet.train.config import TrainConfig
from ahnet.nets import build_model, load_torchvision_weights, model_spec
from ahnet.nets.transfer import format_table, load_source, transfer_and_verify
from ahnet.precision import to_channels_last

from ahnet.train.errors import TrainError
from ahnet.train.order import mix_seed

Builder = Callable[..., nn.Module]


def model_kwargs_for(cfg: TrainConfig) -> dict:
    """Keyword arguments of build_model(cfg.model, ...) for this configuration (plain values), as the model's
    registry entry says: its fixed ones, its training settings by name (an unset one, None, left to the network's
    default), a 2D model's slices per stack from the patch, then --model-kwargs (which set none of those:
    TrainConfig.resolved refuses them)."""
    spec = model_spec(cfg.model)
    kw = dict(spec.fixed)
    kw.update({name: getattr(cfg, name) for name in spec.settings if getattr(cfg, name) is not None})
    if spec.slices:
        kw[spec.slices] = cfg.patch_size[0]
    kw.update(cfg.model_kwargs)
    return kw


def _rebuild_kwargs(model: nn.Module, kw: dict) -> dict:
    """The model's own ``config`` (every kwarg that rebuilds it, plain values) when it has one, else kw."""
    conf = getattr(model, "config", None)
    return dict(conf) if isinstance(conf, dict) else dict(kw)


def build_network(cfg: TrainConfig, builder: Builder | None = None) -> tuple[nn.Module, dict, dict]:
    """(model, model_kwargs, init_info) of a new run; the weights are seeded with cfg.seed.

    ``builder``: a stand-in for ahnet.nets.build_model (tests). --init transfer: transfer_network;
    --imagenet-weights: ahnet.nets.load_torchvision_weights into model.encoder.
    """
    torch.manual_seed(mix_seed(cfg.seed, 7))
    kw = model_kwargs_for(cfg)
    if cfg.init == "transfer":
        return transfer_network(cfg, kw)
    model = (builder or build_model)(cfg.model, **kw)
    info: dict = {"init": cfg.init}
    if cfg.imagenet_weights:
        if not hasattr(model, "encoder"):
            raise TrainError(f"--imagenet-weights: model {cfg.model} has no .encoder to load into.")
        load_torchvision_weights(model.encoder, cfg.imagenet_weights)
        info["imagenet_weights"] = str(cfg.imagenet_weights)
    return model, _rebuild_kwargs(model, kw), info


def transfer_network(cfg: TrainConfig, kw: dict) -> tuple[nn.Module, dict, dict]:
    """The 3D AH-Net from the 2D run --init-from: its checkpoint is read once, the encoder transferred, the
    transfer checked at every encoder stage (the table is printed; TrainError when it is not exact)."""
    try:
        ck_path = paths.resolve_checkpoint(cfg.init_from)
    except paths.LayoutError as e:
        raise TrainError(f"--init-from: {e}") from None
    source = load_source(ck_path)
    if source.meta.get("model_name") != "mcgcn":
        raise TrainError(f"--init-from {ck_path} is a torchvision state dict, not a 2D run; train the 2D stage "
                         f"from it (--stage 2d --imagenet-weights {ck_path}) and transfer from that run.")
    enc2d = f"resnet{source.depth}"
    if kw.get("encoder") != enc2d:
        warnings.warn(f"--encoder {kw.get('encoder')} differs from the 2D run's {enc2d}; using {enc2d}.")
        kw["encoder"] = enc2d
    model, rows = transfer_and_verify(source, **kw)
    print("[train] transfer check (2D encoder vs transferred 3D encoder, slice by slice, eval mode):\n"
          + format_table(rows), flush=True)
    if not all(r.ok for r in rows):
        raise TrainError(f"the 2D -> 3D transfer of {ck_path} is not exact (FAIL rows in the table above); the "
                         f"3D stage does not start.")
    step = source.meta.get("step")
    info = {"init": "transfer", "from": str(ck_path), "from_step": -1 if step is None else int(step)}
    return model, _rebuild_kwargs(model, kw), info


def restore_network(ck: dict, cfg: TrainConfig, ck_path: Path, builder: Builder | None = None
                    ) -> tuple[nn.Module, dict, dict]:
    """(model, model_kwargs, init_info) rebuilt from the checkpoint a run resumes from."""
    torch.manual_seed(mix_seed(cfg.seed, 7))
    model = (builder or build_model)(ck["model_name"], **ck["model_kwargs"])
    try:
        model.load_state_dict(ck.get("train_model", ck["model"]))     # with --ema-decay: the trained weights
    except RuntimeError as e:
        raise CheckpointError(f"{ck_path} does not match {ck['model_name']} built from its model_kwargs "
                              f"({str(e).splitlines()[0]}).") from None
    return model, dict(ck["model_kwargs"]), dict(ck.get("init") or {})


def check_patch_size(model: nn.Module, cfg: TrainConfig) -> None:
    """Every spatial size of the network input must divide by model.input_multiple; else TrainError."""
    mult = getattr(model, "input_multiple", None)
    if mult is None:
        return
    sizes = tuple(cfg.patch_size[1:]) if cfg.stage == "2d" else tuple(cfg.patch_size)
    mult = tuple(int(m) for m in mult)
    if len(mult) != len(sizes):
        return
    if all(s % m == 0 for s, m in zip(sizes, mult)):
        return
    good = tuple(-(-s // m) * m for s, m in zip(sizes, mult))
    lead = (cfg.patch_size[0],) if cfg.stage == "2d" else ()
    raise TrainError(f"--patch-size {' '.join(map(str, cfg.patch_size))} does not fit {cfg.model}: the network "
                     f"input {sizes} must divide by {mult}; try --patch-size {' '.join(map(str, lead + good))}.")


def place_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Check the patch size, move the model to ``device`` (channels-last 3D when asked), train mode."""
    check_patch_size(model, cfg)
    model.to(device)
    if cfg.channels_last:
        if cfg.stage != "3d":
            raise TrainError("--channels-last is a lever of the 3D stage (channels-last 3D memory); drop it for "
                             "--stage 2d.")
        to_channels_last(model)
    return model.train()
