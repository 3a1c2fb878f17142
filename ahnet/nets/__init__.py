"""Networks: the 2D ResNet encoders, the 2D MC-GCN, the 3D AH-Net and the 3D U-Net baseline; the model registry.

All models output logits; every model has ``input_multiple`` (what each spatial size must divide by) and
``config`` (the keyword arguments that rebuild it with ``build_model``). ``MODELS`` is the one list of models:
each entry says how the model sees data (``dims``: 3 = volumes (N, C, D, H, W), inferred by 3D sliding windows;
2 = slice stacks (N, S, H, W), the S slices as channels, inferred slice by slice), which training stage
trains it, and which keyword arguments training gives it (ahnet.train.model.model_kwargs_for builds them from the
entry: no per-model code there).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ahnet.nets.ahnet3d import AHNet3d
from ahnet.nets.mcgcn import MCGCN
from ahnet.nets.resnet import ENCODERS, ResNet2d, load_torchvision_weights
from ahnet.nets.sizes import padded_shape
from ahnet.nets.unet3d import UNet3d


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its name in checkpoints and on the command line, its class, how it sees data, and
    what training builds it with (besides --model-kwargs, which may set none of those keys)."""
    name: str
    cls: type
    dims: int      # 3: (N, C, D, H, W) volumes; 2: (N, S, H, W) stacks of S slices (the model's in_slices)
    stage: str     # the training stage that trains it: "2d" or "3d"
    summary: str
    settings: tuple = ()       # training settings it takes under the same name (--encoder, --pfn-depth)
    fixed: tuple = ()          # (keyword, value) training always gives: one CT channel in, one foreground logit out
    slices: str | None = None  # the keyword of a 2D model's slices per stack (the patch's first size)

    def training_keys(self) -> tuple:
        """Every keyword argument that training sets itself (settings, fixed, slices)."""
        return self.settings + tuple(k for k, _ in self.fixed) + ((self.slices,) if self.slices else ())


MODELS = {s.name: s for s in (
    ModelSpec("ahnet", AHNet3d, 3, "3d", "the 3D AH-Net: anisotropic ResNet encoder (transferable from the 2D "
                                         "stage) and 3D decoder with pyramid pooling",
              settings=("encoder", "pfn_depth"), fixed=(("in_channels", 1), ("out_channels", 1))),
    ModelSpec("mcgcn", MCGCN, 2, "2d", "the 2D MC-GCN on slice stacks (slices as channels)",
              settings=("encoder",), fixed=(("out_channels", 1),), slices="in_slices"),
    ModelSpec("unet3d", UNet3d, 3, "3d", "the 3D U-Net baseline, trained from scratch",
              fixed=(("in_channels", 1), ("out_channels", 1))),
)}


def model_spec(name: str) -> ModelSpec:
    """The registry entry of a model name; ValueError naming the known ones otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, **kwargs) -> nn.Module:
    """build_model("ahnet" | "mcgcn" | "unet3d", **kwargs); kwargs as each class (model.config rebuilds it)."""
    return model_spec(name).cls(**kwargs)


__all__ = ["AHNet3d", "MCGCN", "ResNet2d", "UNet3d", "ModelSpec", "MODELS", "ENCODERS", "model_spec", "build_model",
           "load_torchvision_weights", "padded_shape"]
