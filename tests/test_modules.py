"""--model FILE.py:FUNCTION and zoo names with local weights: what loads, and the one-sentence refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from unitscope.errors import UnitscopeError
from unitscope.modules import is_module_spec, load_module, load_weights
from unitscope.subject import load_subject

MODEL_FILE = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

def not_a_module():
    return [1, 2]
"""


def test_file_function_loads_through_load_subject(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(MODEL_FILE)
    subject = load_subject(f"{f}:build")
    torch.manual_seed(0)
    expected = torch.nn.Conv2d(3, 4, 3)
    assert torch.equal(subject.model[0].weight, expected.weight)
    assert subject.spec == f"{f}:build" and not subject.model.training
    x = torch.rand(1, 3, 8, 8)
    with subject.capture(["1:output"]) as acts:
        subject.model(x)
    assert torch.equal(acts["1:output"], torch.relu(expected(x)))


def test_refusals(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(MODEL_FILE)
    with pytest.raises(UnitscopeError, match=r"returned a list, not a torch.nn.Module"):
        load_module(f"{f}:not_a_module")
    with pytest.raises(UnitscopeError, match="has no function 'missing'"):
        load_module(f"{f}:missing")
    with pytest.raises(UnitscopeError, match="does not exist"):
        load_module(f"{tmp_path / 'nope.py'}:build")
    (tmp_path / "broken.py").write_text("raise ValueError('boom')\n")
    with pytest.raises(UnitscopeError, match="importing model file .* failed: ValueError: boom"):
        load_module(f"{tmp_path / 'broken.py'}:build")
    assert not is_module_spec("gpt2") and is_module_spec("timm:resnet18@w.safetensors")


def test_weights_files(tmp_path):
    t = {"a": torch.arange(3.0)}
    save_file(t, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["a"], t["a"])
    torch.save({"state_dict": t}, tmp_path / "w.pt")
    assert torch.equal(load_weights(tmp_path / "w.pt")["a"], t["a"])

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnitscopeError, match="not a plain state dict of tensors"):
        load_weights(tmp_path / "evil.pt")


def test_zoo_name_needs_its_package_or_fits_weights(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(UnitscopeError, match="needs the torchvision package, which is not installed"):
            load_module(f"torchvision:resnet18@{tmp_path / 'w.safetensors'}")
    else:
        with pytest.raises(UnitscopeError, match="do not fit torchvision:resnet18"):
            load_module(f"torchvision:resnet18@{tmp_path / 'w.safetensors'}")
