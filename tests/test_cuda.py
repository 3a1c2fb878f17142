"""The CUDA path (marker ``cuda``; skipped without a GPU): ``bash run.sh gpu-check`` runs these on a GPU machine
and reports each. ``AHNET_CUDA_TESTS_ON_CPU=1`` rehearses them on a CPU (gpu-check --tiny does, so they cannot
rot): the same code with a tiny network and bfloat16 for float16 -- it proves the tests run, not the GPU.

- fp16 autocast + GradScaler through ahnet.train: a NaN loss is skipped by the loop (scale untouched), an
  overflowing gradient by the scaler (weights unchanged, scale halved), the other steps update; the network
  computes in float16;
- bf16 autocast through ahnet.train;
- channels-last 3D: the outputs and gradients of the contiguous layout, and the training loop keeps the layout;
- exact resume under --deterministic: with nearest upsampling every kernel of AH-Net's backward pass has a
  deterministic version, and two runs and a resumed one agree bit for bit; with trilinear upsampling (the
  paper's) the backward accumulates with atomic adds (torch names the kernel in a warning), so two runs never
  stopped already differ, and the resumed run is held to a stated relative tolerance instead;
- where two GPUs are present: 2 NCCL ranks with SyncBatchNorm equal 1 GPU with the whole batch.
"""
import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # read when CUDA starts: before any CUDA work here

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ahnet.checkpoint import load_checkpoint  # noqa: E402
from ahnet.train.config import TrainConfig  # noqa: E402
from ahnet.nets import build_model  # noqa: E402
from ahnet.precision import to_channels_last  # noqa: E402
from ahnet.train import train  # noqa: E402

from ._ddp_worker import TinyBN, tiny_patches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REHEARSAL = not torch.cuda.is_available() and os.environ.get("AHNET_CUDA_TESTS_ON_CPU") == "1"
pytestmark = pytest.mark.cuda
#: the trilinear-upsampling resume: largest relative distance to the run never stopped (see the test)
RESUME_RTOL_WITH_ATOMICS = 0.05


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if REHEARSAL:
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (AHNET_CUDA_TESTS_ON_CPU=1 rehearses these tests on a CPU)")


def _cfg(tmp, name, device, upsample="nearest", **kw) -> TrainConfig:
    cuda = device.type == "cuda"
    d = dict(stage="3d", model="ahnet", encoder="resnet18", pfn_depth=2, batch_size=2, epochs=1, steps_per_epoch=6,
             lr=1e-3, device=device.type, out=str(tmp / name), seed=7, val_patches=2, amp="fp16" if cuda else "off",
             patch_size=[8, 64, 64] if cuda else [4, 16, 16],
             model_kwargs={"z_pool": "none", "upsample": upsample} if cuda else {})
    d.update(kw)
    return TrainConfig(**d)


def _data(cfg):
    return tiny_patches(16, cfg.patch_size, cfg.seed), tiny_patches(2, cfg.patch_size, cfg.seed + 1)


def _net(device, kw: dict) -> torch.nn.Module:
    """The real AH-Net on a GPU; the tiny stand-in in a CPU rehearsal."""
    if device.type == "cuda":
        return build_model("ahnet", **kw)
    return TinyBN(in_channels=kw.get("in_channels", 1), out_channels=kw.get("out_channels", 1))


def _params(net) -> dict:
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tensors(ck: dict) -> dict:
    out = {f"model.{k}": v for k, v in ck["model"].items()}
    for pid, st in ck["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items()})
    return out


def _rel(a: dict, b: dict, base: dict, keys) -> float:
    """||a - b|| / ||a - base|| over ``keys`` (base None: / ||a||), float64."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    den = sum(float((a[k].double() - (0 if base is None else base[k].double())).pow(2).sum()) for k in keys)
    return (num / max(den, 1e-300)) ** 0.5


def _faults(net, nan_step=None, inf_grad_step=None, dtypes=None):
    """Hooks: the training forward of step ``nan_step`` returns NaN; the gradient of the first parameter is
    infinite at step ``inf_grad_step``; ``dtypes`` collects the output dtype of every training forward."""
    calls = [0]

    def forward_hook(module, args, out):
        if not module.training:
            return None
        calls[0] += 1
        if dtypes is not None:
            dtypes.append(out.dtype)
        return out * float("nan") if calls[0] == nan_step else None

    net.register_forward_hook(forward_hook)
    next(net.parameters()).register_hook(lambda g: g * float("inf") if calls[0] == inf_grad_step else g)


# --------------------------------------------------------------------------------------------- AMP
def test_fp16_steps_skip_a_nan_loss_in_the_loop_and_an_inf_gradient_in_the_scaler(tmp_path, device):
    cfg = _cfg(tmp_path, "fp16", device, ckpt_every=1, steps_per_epoch=8,
               amp="fp16" if device.type == "cuda" else "bf16")
    scaler_on = device.type == "cuda"
    nets, dtypes, params, scales = [], [], {}, {}

    def builder(name, **kw):
        net = _net(device, kw)
        _faults(net, nan_step=2, inf_grad_step=4 if scaler_on else None, dtypes=dtypes)
        nets.append(net)
        params[0] = _params(net)
        return net

    def on_step(step):
        params[step] = _params(nets[-1])
        if step < cfg.steps_per_epoch:            # every step but the epoch's last one has just been saved
            ck = load_checkpoint(Path(cfg.out) / "checkpoints" / "last.pt")
            scales[step] = ck["scaler"].get("scale")
            assert ck["step"] == step and ck["metrics"]["skipped_total"] == (0 if step < 2 else 1)

    res = train(cfg, datasets=_data(cfg), builder=builder, on_step=on_step)
    final = load_checkpoint(Path(cfg.out) / "checkpoints" / "last.pt")
    last = cfg.steps_per_epoch
    scales[0], scales[last] = (65536.0 if scaler_on else None), final["scaler"].get("scale")
    assert res["skipped_total"] == 1 and final["metrics"]["history"][0]["skipped_steps"] == 1
    assert set(dtypes) == {torch.float16 if scaler_on else torch.bfloat16}
    assert _same(params[2], params[1]) and scales[2] == scales[1]        # NaN loss: the loop skipped the step
    assert all(torch.isfinite(p).all() for p in params[last].values())
    plain = [k for k in range(1, last + 1) if k not in (2, 4)]
    updated = [k for k in plain if not _same(params[k], params[k - 1])]
    assert updated
    if scaler_on:
        assert _same(params[4], params[3]) and scales[4] == scales[3] / 2  # inf gradient: the scaler skipped it
        for k in plain:    # an update keeps the scale (growth needs 2000 steps); a genuine overflow halves it
            assert scales[k] == (scales[k - 1] if k in updated else scales[k - 1] / 2), (k, scales)
    else:
        assert updated == plain


def test_bf16_steps(tmp_path, device):
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    cfg = _cfg(tmp_path, "bf16", device, amp="bf16", steps_per_epoch=3)
    nets, dtypes = [], []

    def builder(name, **kw):
        net = _net(device, kw)
        _faults(net, dtypes=dtypes)
        nets.append((net, _params(net)))
        return net

    res = train(cfg, datasets=_data(cfg), builder=builder)
    assert set(dtypes) == {torch.bfloat16} and res["skipped_total"] == 0
    net, before = nets[-1]
    assert not _same(_params(net), before)
    assert load_checkpoint(Path(cfg.out) / "checkpoints" / "last.pt")["amp"] == "bf16"


# --------------------------------------------------------------------------------------- channels last
def test_channels_last_3d_gives_the_contiguous_outputs_and_gradients(device):
    torch.manual_seed(0)
    kw = {"encoder": "resnet18", "pfn_depth": 2, "in_channels": 1, "out_channels": 1, "z_pool": "none",
          "upsample": "nearest"}
    plain = _net(device, kw).to(device)
    last = to_channels_last(copy.deepcopy(plain))
    x = torch.rand(2, 1, 8, 64, 64, device=device) if device.type == "cuda" else torch.rand(2, 1, 4, 16, 16)
    layouts = []
    first_conv = next(m for m in last.modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(
        lambda m, a, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last_3d)))
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        y0, y1 = plain(x), last(to_channels_last(x))
        y0.square().mean().backward()
        y1.square().mean().backward()
    assert layouts == [True]
    assert torch.allclose(y0, y1, rtol=1e-3, atol=1e-4), float((y0 - y1).abs().max())
    g0 = {k: p.grad for k, p in plain.named_parameters()}
    g1 = {k: p.grad for k, p in last.named_parameters()}
    assert _rel(g0, g1, None, g0.keys()) < 1e-3


def test_the_training_loop_keeps_channels_last(tmp_path, device):
    cfg = _cfg(tmp_path, "cl", device, channels_last=True, steps_per_epoch=2)
    nets, layouts = [], []

    def builder(name, **kw):
        net = _net(device, kw)
        nets.append(net)
        return net

    def on_step(step):
        w = next(p for p in nets[-1].parameters() if p.dim() == 5)
        layouts.append(w.is_contiguous(memory_format=torch.channels_last_3d))

    res = train(cfg, datasets=_data(cfg), builder=builder, on_step=on_step)
    assert layouts == [True, True] and res["skipped_total"] == 0


# ---------------------------------------------------------------------------------------------- resume
_RUNS: dict = {}


def _three_runs(tmp, device, upsample):
    """_train_three(...), once per distinct computation: in a CPU rehearsal both resume tests train the same
    tiny network (upsampling is AH-Net's), so the second reuses the first's runs."""
    key = (device.type, upsample if device.type == "cuda" else None)
    if key not in _RUNS:
        _RUNS[key] = _train_three(tmp, device, upsample)
    return _RUNS[key]


def _train_three(tmp, device, upsample):
    """(A, B never stopped; C stopped after step 3 and resumed from step 2; initial weights; nondeterministic
    kernels that torch named in warnings), each run 6 steps under --deterministic, a checkpoint every 2 steps."""
    init = {}

    class Crash(Exception):
        pass

    def builder(name, **kw):
        net = _net(device, kw)
        init.setdefault("model", {f"model.{k}": v.detach().clone() for k, v in net.state_dict().items()})
        return net

    def crash(step):
        if step == 3:
            raise Crash

    def cfg(name, **kw):
        return _cfg(tmp, name, device, upsample=upsample, ckpt_every=2, deterministic=True, **kw)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("a", "b"):
            train(cfg(name), datasets=_data(cfg(name)), builder=builder)
        with pytest.raises(Crash):
            train(cfg("c"), datasets=_data(cfg("c")), builder=builder, on_step=crash)
        train(cfg("c", resume=True), datasets=_data(cfg("c")), builder=builder)
    text = [str(w.message) for w in caught]
    nondet = sorted({t.split()[0] for t in text if "does not have a deterministic implementation" in t})
    a, b, c = (_tensors(load_checkpoint(tmp / n / "checkpoints" / "last.pt")) for n in "abc")
    return a, b, c, init["model"], nondet


def test_resume_is_bitwise_exact_where_every_kernel_is_deterministic(tmp_path, device, record_property):
    a, b, c, _, nondet = _three_runs(tmp_path, device, "nearest")
    record_property("nondeterministic_kernels", json.dumps(nondet))
    assert nondet == []
    assert _same(a, b), "two runs never stopped differ although every kernel is deterministic"
    assert _same(a, c)


def test_resume_with_trilinear_upsampling_stays_within_the_atomic_add_noise(tmp_path, device, record_property):
    """The paper's trilinear upsampling has no deterministic CUDA backward: its gradient is summed with atomic
    adds in an order that changes from run to run, so two runs never stopped already differ by rounding, and
    through Adam and BatchNorm statistics that grows with every step. What can be asserted: where torch names
    no such kernel, bit for bit; otherwise the resumed run lies within RESUME_RTOL_WITH_ATOMICS of the run never
    stopped, relative to how far training moved the weights (parameters) and to the statistics themselves
    (BatchNorm buffers). A resume that lost the optimiser state, the RNG or the data order misses by a fraction
    of order one. The measured distances are recorded for the report."""
    a, b, c, init, nondet = _three_runs(tmp_path, device, "trilinear")
    params = [k for k in init if k in a and not any(s in k for s in ("running_", "num_batches"))]
    buffers = [k for k in a if "running_" in k]
    figures = {"nondeterministic_kernels": nondet,
               "params_rel_resumed": _rel(a, c, init, params), "params_rel_two_runs": _rel(a, b, init, params),
               "bn_buffers_rel_resumed": _rel(a, c, None, buffers),
               "bn_buffers_rel_two_runs": _rel(a, b, None, buffers)}
    record_property("resume_figures", json.dumps(figures))
    if not nondet:
        assert _same(a, b) and _same(a, c), figures
        return
    assert figures["params_rel_resumed"] < RESUME_RTOL_WITH_ATOMICS, figures
    assert figures["bn_buffers_rel_resumed"] < RESUME_RTOL_WITH_ATOMICS, figures


# ---------------------------------------------------------------------------------------------- 2 GPUs
def test_two_gpus_with_sync_batchnorm_equal_one_gpu_with_the_whole_batch(tmp_path, device):
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    run = dict(stage="3d", model="ahnet", encoder="resnet18", patch_size=[4, 16, 16], batch_size=4, epochs=1,
               steps_per_epoch=3, lr=1e-3, device="cuda", seed=5, val_patches=4, sync_bn=True, amp="off",
               dist_timeout=120.0)
    spec = {"runs": [dict(run, out=str(tmp_path / "two"))], "tf32": False}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "tests._ddp_worker", json.dumps(spec)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    one = TrainConfig(**dict(run, out=str(tmp_path / "one")))
    train(one, datasets=(tiny_patches(12, one.patch_size, 5), tiny_patches(4, one.patch_size, 6)),
          builder=lambda name, **kw: TinyBN(**kw))
    a, b = (_tensors(load_checkpoint(tmp_path / n / "checkpoints" / "last.pt")) for n in ("one", "two"))
    worst = max(float((a[k].double().cpu() - b[k].double().cpu()).abs().max()) for k in a)
    assert worst < 1e-4, worst


# ------------------------------------------------------------------------------------------ second stage
def test_the_second_stage_classifier_trains_on_the_device_in_its_amp(device):
    """rescore.fit on the GPU under fp16 with a GradScaler (bf16 in the CPU rehearsal), as the presets run it:
    finite losses, the net on the device, nodule crops scored above the rest."""
    from ahnet.commands.rescore import fit

    rng = np.random.default_rng(0)
    x = rng.random((128, 2, 8, 32, 32)).astype(np.float32)
    x[:64, 1] += 1.0
    y = np.r_[np.ones(64), np.zeros(64)].astype(np.float32)
    net, losses = fit(x, y, 10, 0, width=8, device=device, amp="fp16" if device.type == "cuda" else "bf16")
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert next(net.parameters()).device.type == device.type
    with torch.no_grad():
        p = torch.sigmoid(net(torch.from_numpy(x).to(device)).float()).cpu()
    assert float(p[:64].mean()) > float(p[64:].mean()) + 0.2
