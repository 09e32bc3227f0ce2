"""Hostile files: the store reader and the dictionary loader, fuzzed, fail only with one clear UnitscopeError.

Each example starts from a real, valid file written by unitscope and damages it the way a bad disk, a careless
edit or a malicious sender would: bytes flipped or cut in the safetensors header and body, JSON fields replaced
by values of the wrong type, sign or size. Whatever hypothesis makes, reading must either succeed (and then give
tensors of the shapes the file claims) or raise UnitscopeError; any other exception is a bug. The catalogue in
docs/hostile-input.md lists every bad input the suite checks, with the test that checks it (kept true below).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitscope import UnitscopeError
from unitscope.dictionaries import load_dictionary
from unitscope.dictionaries.base import ARCHITECTURES, CFG, WEIGHTS
from unitscope.store import Store
from unitscope.synthetic import SyntheticSpec, write_synthetic_store

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 60)), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values of every shape a hand-edited or hostile file might hold
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def valid_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "store"
    write_synthetic_store(SyntheticSpec(n_features=12, d=6, rows=96, active=2.0, correlated_pairs=1), out,
                          shard_rows=32)
    return out


@pytest.fixture(scope="module")
def valid_dictionaries(tmp_path_factory) -> dict[str, Path]:
    """One saved dictionary of each registered kind (random weights: loading does not care how they were made)."""
    root = tmp_path_factory.mktemp("dicts")
    out = {}
    for arch, cls in sorted(ARCHITECTURES.items()):
        for units in (8, 6):  # a neuron basis has exactly d_in units
            try:
                d = cls(d_in=6, n_units=units, k=2) if "k" in cls.__init__.__code__.co_varnames else \
                    cls(d_in=6, n_units=units)
            except (TypeError, UnitscopeError):
                continue
            out[arch] = d.save(root / arch)
            break
    assert {"topk", "jumprelu", "standard", "pca", "neurons", "kmeans", "snmf"} <= set(out)
    return out


def _read_everything(store_dir: Path) -> None:
    """What `train`, `eval` and `explain` do with a store: open, list sites, map every shard, touch every array."""
    s = Store.open(store_dir)
    for i in range(s.n_shards):
        shard = s.shard(i)
        for key in shard.keys():
            t = shard.get(key)
            t.sum()  # actually touch the bytes
    for site in s.sites:
        s.width(site)
        next(iter(s.batches(site, batch_size=16)))


def _only_clear_errors(fn, *args) -> None:
    try:
        fn(*args)
    except UnitscopeError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
    # anything else propagates and fails the example


@FUZZ
@given(data=st.data())
def test_a_shard_with_damaged_bytes_is_read_or_refused_in_one_sentence(valid_store, tmp_path_factory, data):
    work = tmp_path_factory.mktemp("shard") / "store"
    shutil.copytree(valid_store, work)
    shard = work / "shards" / "000000.safetensors"
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    how = data.draw(st.sampled_from(["flip_header", "flip_length", "cut", "flip_body", "header_json"]))
    if how == "flip_header":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(8, 8 + n - 1))] = data.draw(st.integers(0, 255))
    elif how == "flip_length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    elif how == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip_body":
        raw[data.draw(st.integers(8 + n, len(raw) - 1))] ^= 0xFF
    else:  # a well-formed header whose entries lie about dtype, shape or offsets
        header = json.loads(raw[8:8 + n])
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
        if field == "whole":
            header[key] = data.draw(ANY_JSON)
        else:
            header[key][field] = data.draw(ANY_JSON)
        body = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    shard.write_bytes(bytes(raw))
    _only_clear_errors(_read_everything, work)
    if how == "flip_body":  # same size, so only the checksum can tell: verify must
        with pytest.raises(UnitscopeError, match="checksum"):
            Store.open(work).verify()


@FUZZ
@given(field=st.sampled_from(["sites", "shards", "n_tokens", "n_windows", "ctx_len", "dtype", "model", "corpus",
                              "format_version", "complete", "shard_tokens"]),
       value=ANY_JSON)
def test_a_manifest_with_a_wrong_field_is_read_or_refused_in_one_sentence(valid_store, tmp_path_factory, field,
                                                                          value):
    work = tmp_path_factory.mktemp("manifest") / "store"
    shutil.copytree(valid_store, work)
    manifest = json.loads((work / "store.json").read_text())
    manifest[field] = value
    (work / "store.json").write_text(json.dumps(manifest))
    _only_clear_errors(_read_everything, work)


def _use(path: Path) -> None:
    d = load_dictionary(path)
    x = torch.randn(3, d.d_in)
    codes = d.encode(x)
    assert codes.shape == (3, d.n_units)
    assert d.decode(codes).shape[-1] == (d.d_out or d.d_in)


@FUZZ
@given(data=st.data())
def test_a_dictionary_with_damaged_files_is_loaded_or_refused_in_one_sentence(valid_dictionaries, tmp_path_factory,
                                                                              data):
    arch = data.draw(st.sampled_from(sorted(valid_dictionaries)))
    work = tmp_path_factory.mktemp("dict") / arch
    shutil.copytree(valid_dictionaries[arch], work)
    how = data.draw(st.sampled_from(["cfg_field", "cfg_bytes", "weights_bytes", "weights_cut", "weights_swap"]))
    if how == "cfg_field":
        cfg = json.loads((work / CFG).read_text())
        key = data.draw(st.sampled_from(sorted(cfg) + ["d_in", "d_sae", "k", "architecture", "dtype"]))
        cfg[key] = data.draw(ANY_JSON)
        (work / CFG).write_text(json.dumps(cfg))
    elif how == "cfg_bytes":
        raw = bytearray((work / CFG).read_bytes())
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        (work / CFG).write_bytes(bytes(raw))
    elif how == "weights_bytes":
        raw = bytearray((work / WEIGHTS).read_bytes())
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        (work / WEIGHTS).write_bytes(bytes(raw))
    elif how == "weights_cut":
        raw = (work / WEIGHTS).read_bytes()
        (work / WEIGHTS).write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    else:  # weights of another kind or shape under this kind's cfg.json
        other = data.draw(st.sampled_from(sorted(valid_dictionaries)))
        shutil.copy(valid_dictionaries[other] / WEIGHTS, work / WEIGHTS)
    _only_clear_errors(_use, work)


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(valid_dictionaries, tmp_path):
    """A pickle whose loading would run code: the loader reads safetensors only, so it refuses the file unrun."""
    work = tmp_path / "topk"
    shutil.copytree(valid_dictionaries["topk"], work)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"W_enc": Evil()}, work / WEIGHTS)
    with pytest.raises(UnitscopeError, match="not a readable safetensors file"):
        load_dictionary(work)
    assert not marker.exists()


def test_the_catalogue_names_at_least_25_bad_inputs_each_with_a_test_that_exists():
    """docs/hostile-input.md stays true: every row names a test function that is in the suite."""
    text = (REPO / "docs" / "hostile-input.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    assert len(rows) >= 25, len(rows)
    for row in rows:
        refs = re.findall(r"`(tests/test_\w+\.py)::(\w+)`", row)
        assert refs, f"catalogue row names no test: {row}"
        for path, name in refs:
            source = (REPO / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} does not exist ({row})"
