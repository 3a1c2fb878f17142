"""Speed / memory levers change nothing beyond float tolerance: activation checkpointing (outputs, gradients
and BatchNorm running statistics), channels_last_3d memory format."""
import copy

import pytest
import torch

from ahnet.nets import AHNet3d, build_model
from ahnet.nets.blocks import count_parameters

SMALL = dict(encoder="resnet18", pfn_depth=2, growth=4, layers_per_block=2, z_pool="spacing", spacing=(2.5, .7, .7))


def _train_step(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    return y.detach(), grads, bufs


@pytest.mark.parametrize("mode", ["encoder", "decoder", "all"])
def test_checkpoint_same_outputs_gradients_and_bn_stats(mode):
    torch.manual_seed(0)
    base = AHNet3d(**SMALL, upsample="transpose")
    ck = copy.deepcopy(base)
    ck.set_checkpoint(mode)
    assert ck.config["checkpoint"] == mode and count_parameters(ck) == count_parameters(base)
    x = torch.randn(2, 1, 16, 32, 32)
    y0, g0, b0 = _train_step(base, x)
    y1, g1, b1 = _train_step(ck, x)
    assert torch.allclose(y0, y1, atol=1e-6)
    worst = max((g0[n] - g1[n]).abs().max().item() / (g0[n].abs().max().item() + 1e-12) for n in g0)
    assert worst < 1e-4
    for n in b0:   # running stats updated once per step, as without checkpointing
        assert torch.allclose(b0[n].float(), b1[n].float(), atol=1e-6), n
    assert int(b1["encoder.bn1.num_batches_tracked"]) == 1


def test_checkpoint_is_recorded_and_rebuilt_and_inert_in_eval():
    m = AHNet3d(**SMALL, checkpoint=True)
    assert m.config["checkpoint"] == "all" and m.encoder.checkpoint
    clone = build_model("ahnet", **m.config)
    assert clone.config["checkpoint"] == "all"
    assert AHNet3d(**SMALL).config["checkpoint"] == "none"      # the paper's behaviour by default
    clone.load_state_dict(m.state_dict())
    m.eval()
    m.set_checkpoint("none")
    clone.eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), clone(x))
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        AHNet3d(**SMALL, checkpoint="dense")


def test_checkpoint_saves_memory_in_the_autograd_graph():
    # Count the bytes autograd keeps for backward: checkpointing must keep far fewer.
    def saved_bytes(model, x):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()(x).sum()
        return total[0]
    torch.manual_seed(0)
    m = AHNet3d(**SMALL)
    x = torch.randn(1, 1, 16, 64, 64)
    plain = saved_bytes(m, x)
    m.set_checkpoint("all")
    assert saved_bytes(m, x) < 0.4 * plain     # 0.36 (0.25 before the plain step's fused BN-ReLU-conv units)


def test_channels_last_3d_same_results():
    torch.manual_seed(0)
    m = AHNet3d(**SMALL).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        y0 = m(x)
        mc = copy.deepcopy(m).to(memory_format=torch.channels_last_3d)
        y1 = mc(x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.allclose(y0, y1, atol=1e-5)


def test_channels_last_3d_same_gradients_and_bn_stats():
    # float64: the same arithmetic in another memory order agrees to rounding of 1e-16 (float32 train-mode
    # BatchNorm over few values amplifies rounding to 1e-2 on gradients that are near zero).
    torch.manual_seed(0)
    base = AHNet3d(**SMALL).double()
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 16, 32, 32, dtype=torch.float64)
    y0, g0, b0 = _train_step(base, x)
    y1, g1, b1 = _train_step(cl, x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.allclose(y0, y1, rtol=0, atol=1e-10)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-8, atol=1e-12), n
    for n in b0:
        assert torch.allclose(b0[n].double(), b1[n].double(), rtol=1e-10, atol=1e-12), n


def test_channels_last_3d_stays_channels_last_through_the_decoder():
    """Every decoder module's output of a channels-last network on a channels-last input is channels-last too:
    one plainly contiguous map (the pyramid's broadcast 1 x 1 level once made the concatenation, the head's BN
    and ReLU and their backward contiguous) costs a layout conversion at each convolution after it."""
    torch.manual_seed(0)
    m = AHNet3d(encoder="resnet18", pfn_depth=4, growth=4, layers_per_block=1, z_pool="spacing",
                spacing=(2.5, .7, .7)).to(memory_format=torch.channels_last_3d)
    outs = {}
    for name, mod in m.named_children():
        if name != "encoder":
            mod.register_forward_hook(lambda mod, i, o, name=name: outs.__setitem__(name, o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(1, 1, 16, 64, 64).contiguous(memory_format=torch.channels_last_3d))
    assert "pyramid" in outs and outs["pyramid"].shape[1] == 4 + m.dense4.out_channels
    plain = [n for n, o in outs.items() if not o.is_contiguous(memory_format=torch.channels_last_3d)]
    assert plain == []
