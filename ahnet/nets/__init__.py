"""Networks: the 2D ResNet encoders, the 2D MC-GCN, the 3D AH-Net and the 3D U-Net baseline.

All models output logits; every model has `input_multiple` (what each spatial size must divide by) and
`config` (the keyword arguments that rebuild it with `build_model`).
"""
from __future__ import annotations

from torch import nn

from .ahnet3d import AHNet3d
from .mcgcn import MCGCN
from .resnet import ResNet2d, load_torchvision_weights
from .sizes import padded_shape
from .unet3d import UNet3d

MODELS = {"ahnet": AHNet3d, "mcgcn": MCGCN, "unet3d": UNet3d}


def build_model(name: str, **kwargs) -> nn.Module:
    """build_model("ahnet" | "mcgcn" | "unet3d", **kwargs); kwargs as each class (model.config rebuilds it)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def model_name(model: nn.Module) -> str:
    for name, cls in MODELS.items():
        if isinstance(model, cls):
            return name
    raise ValueError(f"{type(model).__name__} is not one of the project's models")


__all__ = ["AHNet3d", "MCGCN", "ResNet2d", "UNet3d", "build_model", "model_name", "load_torchvision_weights",
           "padded_shape", "MODELS"]
