"""`--device auto`: a model loaded with a device map (accelerate) computes what the plain load computes.

Only CPU and disk exist here, so the test forces offload: the CPU is capped below the model's size and the rest of
the weights go to disk, loaded module by module during each forward. Splitting over several GPUs is the same code
path in accelerate but is not exercised here.
"""

import json

import pytest
import torch

from unitscope import load_subject
from unitscope.errors import UnitscopeError
from unitscope.subject import parse_device_map

SITES = ["blocks.0.resid_post", "blocks.1.mlp_out"]


@pytest.fixture(scope="module")
def plain_and_mapped(tiny_model_dir):
    plain = load_subject(str(tiny_model_dir))
    size = sum(p.numel() * p.element_size() for p in plain.model.parameters())
    mapped = load_subject(str(tiny_model_dir), device=f"auto:cpu={size * 7 // 10}")  # the embedding and block 0 fit
    return plain, mapped


def test_an_offloaded_model_gives_the_plain_models_activations_and_logits(plain_and_mapped, tokenizer):
    plain, mapped = plain_and_mapped
    placed = set(mapped.model.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed, placed  # really split, not one device
    assert any(p.device.type == "meta" for p in mapped.model.parameters())  # offloaded weights are not resident
    assert mapped.device == torch.device("cpu")
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mapped.logits(ids), plain.logits(ids), rtol=0, atol=1e-6)
    a, b = plain.collect(ids, SITES), mapped.collect(ids, SITES)  # the forward stops after the last site
    for site in SITES:
        torch.testing.assert_close(b[site], a[site], rtol=0, atol=1e-6)
    torch.testing.assert_close(mapped.logits(ids), plain.logits(ids), rtol=0, atol=1e-6)  # after a stopped forward
    assert mapped.fingerprint() == plain.fingerprint()  # offloaded weights are read for it, the same hash


def test_record_with_a_device_map_writes_the_plain_store(tmp_path, tiny_model_dir):
    from unitscope.cli import main

    args = ["record", "--model", str(tiny_model_dir), "--site", "blocks.1.resid_post", "--ctx-len", "16",
            "--tokens", "600", "--shard-tokens", "256", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--device", "auto:cpu=150000", "--out", str(tmp_path / "mapped")]) == 0
    m1, m2 = (json.loads((tmp_path / d / "store.json").read_text()) for d in ("plain", "mapped"))
    assert m1["shards"] and m1["model_fingerprint"] == m2["model_fingerprint"]
    for e1, e2 in zip(m1["shards"], m2["shards"], strict=True):
        assert e1 == e2  # the same shard hashes: the same activations, byte for byte
        assert (tmp_path / "plain" / e1["file"]).read_bytes() == (tmp_path / "mapped" / e2["file"]).read_bytes()


def test_device_map_specs_are_checked():
    assert parse_device_map("cpu") is None and parse_device_map("cuda:1") is None
    assert parse_device_map("auto") == {}
    assert parse_device_map("auto:cpu=2GiB") == {"cpu": "2GiB"}
    assert parse_device_map("auto:cpu=1000") == {"cpu": 1000}
    for bad in ("auto:cpu", "auto:gpu=1GB", "auto:cpu=lots"):
        with pytest.raises(UnitscopeError, match="is not DEVICE=SIZE"):
            parse_device_map(bad)
    if torch.cuda.device_count() == 0:
        with pytest.raises(UnitscopeError, match="caps GPU 0, but this machine has 0 CUDA device"):
            parse_device_map("auto:0=1GiB")
    with pytest.raises(UnitscopeError, match="loads transformers models only"):
        load_subject(torch.nn.Linear(2, 2), device="auto", tokenizer=object())


def test_a_device_map_is_refused_where_one_device_is_needed(capsys):
    from unitscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--store", "s", "--train-device", "auto"])
    assert e.value.code == 2
    assert "'auto' is a device map, for --device (the model) only; give one device" in capsys.readouterr().err
