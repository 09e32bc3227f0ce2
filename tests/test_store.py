"""Store: write, memory-mapped read, shuffled batches, identity checks, corruption detection."""

import json

import numpy as np
import pytest
import torch

from unitscope import Store, UnitscopeError

IDENTITY = {"model": "m", "sites": {"s": {"width": 4}}, "dtype": "float32", "ctx_len": 8,
            "corpus": {"spec": "default", "field": "text", "seed": 0}}


def _fill(root, n_shards=3, rows=16):
    st = Store.create(root, IDENTITY)
    for i in range(n_shards):
        base = i * rows
        st.append_shard(np.arange(base, base + rows), np.zeros(rows), np.arange(rows) % 8,
                        {"s": torch.arange(base * 4, (base + rows) * 4, dtype=torch.float32).view(rows, 4)}, windows=2)
    return st


def test_write_then_read(tmp_path):
    _fill(tmp_path / "st")
    st = Store.open(tmp_path / "st")
    assert st.n_tokens == 48 and st.n_shards == 3 and st.n_windows == 6 and st.width("s") == 4
    assert torch.equal(st.acts("s", 1)[0], torch.tensor([64.0, 65, 66, 67]))
    assert st.column("tokens").tolist() == list(range(48))
    st.verify()


def test_batches_cover_every_masked_row_once_per_epoch_and_are_reproducible(tmp_path):
    st = _fill(tmp_path / "st")
    mask = st.column("pos") > 0
    rows = torch.cat(list(st.batches("s", 6, mask=mask, seed=3, epochs=1)))
    ids = (rows[:, 0] / 4).long().sort().values
    assert set(ids.tolist()) <= set(np.flatnonzero(mask).tolist())
    assert len(set(ids.tolist())) == len(ids) == (mask.sum() // 6) * 6
    a = list(st.batches("s", 6, mask=mask, seed=3, epochs=2))
    b = list(st.batches("s", 6, mask=mask, seed=3, start_batch=4, epochs=2))
    assert all(torch.equal(x, y) for x, y in zip(a[4:], b))
    assert not all(torch.equal(x, y) for x, y in zip(a, list(st.batches("s", 6, mask=mask, seed=4, epochs=2))))


def test_a_store_with_other_identity_is_refused(tmp_path):
    _fill(tmp_path / "st")
    for key, value in (("model", "other"), ("sites", {"t": {"width": 4}})):
        with pytest.raises(UnitscopeError, match=f"different {key}"):
            Store.create(tmp_path / "st", {**IDENTITY, key: value})
    assert Store.open(tmp_path / "st").n_tokens == 48  # nothing damaged


def test_corrupt_manifest_and_truncated_or_corrupt_shards_are_named(tmp_path):
    _fill(tmp_path / "st")
    shard = tmp_path / "st" / "shards" / "000001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(UnitscopeError, match="000001.safetensors is truncated"):
        Store.open(tmp_path / "st").acts("s", 1)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(UnitscopeError, match="000001.safetensors is corrupt"):
        Store.open(tmp_path / "st").verify()
    shard.write_bytes(b"\xff" * len(data))
    with pytest.raises(UnitscopeError, match="000001.safetensors is corrupt"):
        Store.open(tmp_path / "st").acts("s", 1)
    (tmp_path / "st" / "store.json").write_text("{not json")
    with pytest.raises(UnitscopeError, match="manifest .* is corrupt"):
        Store.open(tmp_path / "st")


def test_non_finite_activations_name_the_shard(tmp_path):
    st = Store.create(tmp_path / "st", IDENTITY)
    x = torch.ones(16, 4)
    x[3, 2] = float("nan")
    st.append_shard(np.arange(16), np.zeros(16), np.arange(16) % 8, {"s": x}, windows=2)
    with pytest.raises(UnitscopeError, match="000000.safetensors"):
        list(st.batches("s", 16, epochs=1))


def test_manifest_is_json_with_checksums(tmp_path):
    _fill(tmp_path / "st")
    m = json.loads((tmp_path / "st" / "store.json").read_text())
    assert m["shards"][0]["file"] == "shards/000000.safetensors"
    assert len(m["shards"][0]["sha256"]) == 64 and m["shards"][0]["tokens"] == 16


@pytest.mark.parametrize("breakage", [
    lambda m: m.pop("tokens"), lambda m: m.update(sites={}), lambda m: m.update(corpus={}), lambda m: m.pop("model"),
    lambda m: m["shards"][0].update(tokens=-16), lambda m: m["shards"][0].update(windows=True),
    lambda m: m.update(tokens=47), lambda m: m["shards"][1].update(windows=1),
    lambda m: m["shards"][0].update(file="../../etc/passwd"), lambda m: m.update(ctx_len="8"),
    lambda m: m["sites"]["s"].update(width=0),
])
def test_a_manifest_with_a_missing_or_wrong_field_is_refused_in_one_sentence(tmp_path, breakage):
    """Fields the readers use, hand-edited or damaged: refused at open, never a KeyError or IndexError later."""
    _fill(tmp_path / "st")
    m = json.loads((tmp_path / "st" / "store.json").read_text())
    breakage(m)
    (tmp_path / "st" / "store.json").write_text(json.dumps(m))
    with pytest.raises(UnitscopeError, match="is corrupt"):
        Store.open(tmp_path / "st")
