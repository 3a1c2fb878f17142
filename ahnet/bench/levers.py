"""Our levers that are on by default, switched back one at a time for a row that measures each alone (used by
the model rows and the preset's steps)."""
from __future__ import annotations


def our_levers(net, levers: dict, dtype: str, device) -> None:
    """Ours as training runs it, less the switched levers (plan.OURS_OFF): the depth guard on a CPU in bf16 (by
    levers["guard"], default pad), the fused BN-ReLU-conv units (off by fused=off, for this process), the
    z-pooling as DepthMaxPool (zpool=maxpool: max_pool3d instead)."""
    from ahnet.nets.fused import use_fused
    from ahnet.nets.pooling import DepthMaxPool, MaxPool3d
    from ahnet.precision import guard_cpu_bf16_convs

    if device.type == "cpu" and dtype == "bf16":
        guard_cpu_bf16_convs(net, levers.get("guard", "pad"))
    use_fused(levers.get("fused") != "off")
    if levers.get("zpool") == "maxpool":
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, DepthMaxPool):
                    setattr(parent, name, MaxPool3d((2, 1, 1), (2, 1, 1)))
