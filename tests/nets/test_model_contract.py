"""The contract every registered model keeps, written once (ModelContract) and run for each model of
ahnet.nets.MODELS, each in a few lines (segmentation_models_pytorch style):

- the registry entry matches the class and the input layout (dims);
- config round trip: ``build_model(name, **model.config)`` (plain JSON values, through a weights_only
  checkpoint) rebuilds the same network: same parameters, same output;
- the output keeps the input's spatial size at any multiple of ``input_multiple``;
- a size off the multiple, a wrong rank or a wrong channel count is a ValueError in one sentence;
- in training, the gradient reaches every parameter (finite and non-zero).
"""
import json
import re

import pytest
import torch

from ahnet.nets import MODELS, build_model


class ModelContract:
    name: str            # registry name
    kwargs: dict         # a small configuration of the model
    shape: tuple         # (N, C, *spatial): an input that fits

    def build(self):
        torch.manual_seed(0)
        return build_model(self.name, **self.kwargs)

    def test_registry_entry(self):
        spec, model = MODELS[self.name], self.build()
        assert isinstance(model, spec.cls) and spec.stage in ("2d", "3d")
        assert len(model.input_multiple) == spec.dims == len(self.shape) - 2

    def test_config_round_trip(self, tmp_path):
        model = self.build().eval()
        torch.save({"model": model.state_dict(), "model_name": self.name, "model_kwargs": model.config},
                   tmp_path / "m.pt")
        ck = torch.load(tmp_path / "m.pt", weights_only=True)
        assert json.loads(json.dumps(ck["model_kwargs"])) == model.config          # plain values
        torch.manual_seed(1)                                                         # other initial weights
        clone = build_model(ck["model_name"], **ck["model_kwargs"]).eval()
        assert clone.config == model.config
        clone.load_state_dict(ck["model"])                                           # same names and shapes
        x = torch.randn(self.shape)
        with torch.no_grad():
            assert torch.equal(model(x), clone(x))

    def test_output_keeps_the_input_size_at_any_multiple(self):
        model = self.build().eval()
        mult = model.input_multiple
        out_ch = model.config["out_channels"]
        for extra in (0, 1):                      # the given size, then one more multiple on the last axis
            shape = self.shape[:-1] + (self.shape[-1] + extra * mult[-1],)
            with torch.no_grad():
                assert model(torch.randn(shape)).shape == (shape[0], out_ch) + shape[2:]

    def test_bad_inputs_are_one_sentence(self):
        model = self.build().eval()
        mult = tuple(model.input_multiple)
        off = self.shape[:-1] + (self.shape[-1] + 1,)
        with pytest.raises(ValueError, match="divisible by " + re.escape(str(mult))) as e:
            model(torch.randn(off))
        assert "\n" not in str(e.value) and str(off) in str(e.value)
        for bad in (self.shape[1:], (self.shape[0], self.shape[1] + 1) + self.shape[2:]):
            with pytest.raises(ValueError) as e:
                model(torch.randn(bad))
            assert "\n" not in str(e.value) and str(tuple(bad)) in str(e.value)

    def test_gradient_reaches_every_parameter(self):
        model = self.build().train()
        model(torch.randn(self.shape)).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing
        dead = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
        assert not dead


class TestAHNet3d(ModelContract):
    name = "ahnet"
    kwargs = dict(encoder="resnet18", pfn_depth=2, growth=4, layers_per_block=2, z_pool="spacing",
                  spacing=(2.5, 0.7, 0.7))
    shape = (2, 1, 16, 32, 32)


class TestMCGCN(ModelContract):
    name = "mcgcn"
    kwargs = dict(encoder="resnet18")
    shape = (2, 3, 32, 32)


class TestMCGCNFiveSlices(ModelContract):
    name = "mcgcn"
    kwargs = dict(encoder="resnet18", in_slices=5)
    shape = (2, 5, 32, 32)


class TestUNet3d(ModelContract):
    name = "unet3d"
    kwargs = dict(base_channels=4, max_channels=16, z_pool="none")
    shape = (2, 1, 2, 32, 32)


def test_every_registered_model_keeps_the_contract():
    assert {c.name for c in ModelContract.__subclasses__()} == set(MODELS)
