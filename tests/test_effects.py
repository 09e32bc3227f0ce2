"""Unit effects (causal.effects, `unitscope effects`): the stored table against a from-scratch recomputation
(plain forward hooks on the model's own module, no unitscope intervention code), on the tiny Llama through
record -> explain -> effects, and on the default model the done-when check: ablating the neurons that promote a
token (by the logit lens) lowers that token's probability where they fire."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from unitscope import Corpus, record
from unitscope.causal.effects import unit_effects, write_effects
from unitscope.cli import main
from unitscope.dictionaries.linear import Neurons
from unitscope.dictionaries.sae import TopKSAE
from unitscope.errors import UnitscopeError
from unitscope.explain import logit_lens, write_tables

SITE = "blocks.1.resid_post"
UNITS = [2, 5, 11]


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_subject):
    root = tmp_path_factory.mktemp("eff")
    return record(llama_subject, Corpus("default"), [SITE], 1000, root / "s", ctx_len=16, batch_size=4,
                  shard_tokens=400, progress=False)


def _topk() -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(32, 24, k=3, metadata={"hook_name": SITE}).eval()


@pytest.fixture(scope="module")
def explained(tmp_path_factory, store, llama_subject):
    d = _topk()
    out = tmp_path_factory.mktemp("explained") / "ex"
    write_tables(out, d, store, SITE, llama_subject.tokenizer, lens=logit_lens(llama_subject, d, units=UNITS),
                 top_n=3, quantile_n=0, random_n=0, units=UNITS, progress=False)
    return d, out


def _from_scratch(subject, module, edit_unit, windows, value, directions, encode, pre=False):
    """KL, next-token dlogp and per-token mean dlogp for one unit, with hand-written hooks on `module` (its output,
    or its input when `pre`): each window's clean forward gives the site activation, the unit's code is computed
    from it by hand, and r' = r + (value - c_u) * directions[u] at the positions where that code is > 0 (not a
    window's first position, not a special token)."""
    specials = set(subject.tokenizer.all_special_ids)
    kl = nxt = n = nn = 0.0
    mean = None
    for ids_list in windows:
        ids = torch.tensor([ids_list])
        seen = {}

        def grab(_m, args, out=None, seen=seen):
            r = args[0] if pre else (out[0] if isinstance(out, tuple) else out)
            seen["r"] = r.detach().clone()

        with torch.no_grad():
            h = module.register_forward_pre_hook(grab) if pre else module.register_forward_hook(grab)
            try:
                clean = subject.model(input_ids=ids, use_cache=False).logits[0].log_softmax(-1)
            finally:
                h.remove()
            code = encode(seen["r"])[0, :, edit_unit]
        pos = [t for t in range(len(ids_list)) if t > 0 and ids_list[t] not in specials and code[t] > 0]
        if not pos:
            continue

        def hook(_m, _a, out, pos=pos):
            r = out[0] if isinstance(out, tuple) else out
            c = encode(r)[..., edit_unit]
            new = r.clone()
            new[:, pos] = r[:, pos] + ((value - c[:, pos])[..., None] * directions[edit_unit])
            return (new, *out[1:]) if isinstance(out, tuple) else new

        def pre_hook(_m, args, pos=pos):
            return (hook(_m, None, args[0]), *args[1:])

        with torch.no_grad():
            h = module.register_forward_pre_hook(pre_hook) if pre else module.register_forward_hook(hook)
            try:
                edited = subject.model(input_ids=ids, use_cache=False).logits[0].log_softmax(-1)
            finally:
                h.remove()
        c, e = clean[pos], edited[pos]
        kl += float((c.exp() * (c - e)).sum())
        d = (e - c).sum(0)
        mean = d if mean is None else mean + d
        n += len(pos)
        for i, t in enumerate(pos):
            if t + 1 < len(ids_list):
                nxt += float(e[i, ids_list[t + 1]] - c[i, ids_list[t + 1]])
                nn += 1
    return kl / n, nxt / nn, mean / n, n


def _stale_copy(out, dst):
    """The explanation with every stored code moved 3 tokens later: the windows (and their ranks) are unchanged,
    but the stored positions are not where the unit fires, as when a table no longer matches the live forward."""
    import shutil

    import numpy as np
    import pyarrow as pa

    dst.mkdir()
    shutil.copy(out / "units.parquet", dst / "units.parquet")
    t = pq.read_table(out / "examples.parquet")
    acts = [np.roll(np.asarray(a, np.float32), 3).tolist() for a in t["acts"].to_pylist()]
    i = t.schema.get_field_index("acts")
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(acts, t.schema.field(i).type)),
                   dst / "examples.parquet")
    return dst


def test_stored_effects_equal_a_recomputation_from_scratch(explained, llama_subject, tmp_path):
    """Computed on a stale copy of the table (stored codes shifted 3 tokens), so an `effects` that edited and
    averaged where the stored code fired, instead of where the unit fires in the forward it runs, would differ
    from the hand computation."""
    d, out = explained
    stale = _stale_copy(out, tmp_path / "stale")
    table = unit_effects(llama_subject, d, stale, units=UNITS, windows=2, clamp_factor=2.0)
    path = write_effects(stale, table)
    assert sorted(p.name for p in stale.iterdir()) == ["effects.parquet", "examples.parquet", "units.parquet"]
    stored = pq.read_table(path).to_pylist()
    ex = pq.read_table(out / "examples.parquet").to_pylist()
    units = {r["unit"]: r for r in pq.read_table(out / "units.parquet").to_pylist()}
    module = llama_subject.model.model.layers[1]
    moved = 0
    for row in stored:
        u = row["unit"]
        wins = sorted((r for r in ex if r["unit"] == u and r["kind"] == "top"), key=lambda r: r["rank"])[:2]
        assert row["windows"] == [w["window"] for w in wins]
        ids = [w["token_ids"] for w in wins]
        kl, nxt, mean, n = _from_scratch(llama_subject, module, u, ids, 0.0, d.W_dec.detach(), d.encode)
        assert row["n_positions"] == n
        assert row["kl_ablate"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert row["dlogp_next_ablate"] == pytest.approx(nxt, rel=1e-4, abs=1e-6)
        assert row["kl_ablate"] > 0
        top_ids = mean.topk(10, largest=False).indices.tolist()
        assert row["boosted_ids"] == top_ids
        assert row["boosted_dlogp"] == pytest.approx(mean[top_ids].tolist(), rel=1e-4, abs=1e-6)
        assert row["suppressed_ids"] == mean.topk(10).indices.tolist()
        clamp = 2.0 * units[u]["max_activation"]
        assert row["clamp_value"] == pytest.approx(clamp)
        kl_c, nxt_c, _, _ = _from_scratch(llama_subject, module, u, ids, clamp, d.W_dec.detach(), d.encode)
        assert row["kl_clamp"] == pytest.approx(kl_c, rel=1e-4, abs=1e-7)
        assert row["dlogp_next_clamp"] == pytest.approx(nxt_c, rel=1e-4, abs=1e-6)
        assert row["lens_promoted_tokens"] == units[u]["promoted_tokens"]
        fired = [[t for t, a in enumerate(w["acts"]) if a > 0] for w in wins]
        stale_pos = [[t + 3 for t in f if t + 3 < len(w["acts"])] for f, w in zip(fired, wins)]
        moved += stale_pos != fired
    assert moved == len(stored)  # the stale table names other positions for every unit


def test_a_module_subject_gives_the_same_effects(explained, llama_subject, tmp_path):
    """`FILE.py:FUNCTION` subjects (a plain module called with the ids, no tokenizer) go through the same path:
    the tiny Llama behind such a function gives the Hugging Face subject's figures."""
    from unitscope import load_subject

    d, out = explained
    torch.save(llama_subject.model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "lm.py").write_text(f"""
import torch, transformers as tf

class LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        cfg = tf.LlamaConfig(vocab_size={len(llama_subject.tokenizer)}, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256)
        self.lm = tf.LlamaForCausalLM(cfg)
        self.lm.load_state_dict(torch.load({str(tmp_path / "w.pt")!r}, weights_only=True))

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits

def build():
    return LM()
""")
    subject = load_subject(f"{tmp_path / 'lm.py'}:build")
    assert subject.tokenizer is None
    moved = d.__class__(32, 24, k=3, metadata={"hook_name": "lm.model.layers.1:output"}).eval()
    moved.load_state_dict(d.state_dict())
    mine = unit_effects(subject, moved, out, units=UNITS[:2], windows=2).to_pylist()
    theirs = unit_effects(llama_subject, d, out, units=UNITS[:2], windows=2).to_pylist()
    for a, b in zip(mine, theirs):
        assert a["kl_ablate"] == pytest.approx(b["kl_ablate"], rel=1e-5)
        assert a["boosted_ids"] == b["boosted_ids"] and a["boosted_tokens"] == [str(i) for i in b["boosted_ids"]]


def test_bad_input(explained, llama_subject, tmp_path):
    d, out = explained
    with pytest.raises(UnitscopeError, match="out of range"):
        unit_effects(llama_subject, d, out, units=[24])
    with pytest.raises(UnitscopeError, match="has no top examples"):
        unit_effects(llama_subject, d, out, units=[3])
    with pytest.raises(UnitscopeError, match="no examples.parquet"):
        unit_effects(llama_subject, d, tmp_path, units=[2])


def _cli(capsys, *args):
    """`unitscope ARGS` in this process (a subprocess would pay torch's import each time): status, stderr."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_with_store_and_with_explanations(tiny_model_dir, tmp_path, capsys):
    from unitscope import load_subject

    subject = load_subject(str(tiny_model_dir))
    st = record(subject, Corpus("default"), [SITE], 600, tmp_path / "s", ctx_len=16, batch_size=4, progress=False)
    d = _topk()
    d.metadata.update(st.provenance())
    d.save(tmp_path / "d")
    code, err = _cli(capsys, "effects", "--dictionary", tmp_path / "d", "--store", tmp_path / "s", "--out",
                     tmp_path / "ex", "--units", "2", "5", "--windows", "2", "--quiet")
    assert code == 0, err
    first = pq.read_table(tmp_path / "ex" / "effects.parquet").to_pylist()
    assert [row["unit"] for row in first] == [2, 5] and all(row["n_windows"] == 2 for row in first)
    code, err = _cli(capsys, "effects", "--dictionary", tmp_path / "d", "--explanations", tmp_path / "ex", "--out",
                     tmp_path / "o", "--units", "2", "--windows", "2", "--quiet")
    assert code == 0, err
    again = pq.read_table(tmp_path / "o" / "effects.parquet").to_pylist()
    assert again[0]["kl_ablate"] == pytest.approx(first[0]["kl_ablate"], rel=1e-5)
    code, err = _cli(capsys, "effects", "--dictionary", tmp_path / "d", "--explanations", tmp_path / "ex", "--out",
                     tmp_path / "o", "--units", "99", "--quiet")
    assert code == 2 and "unit 99" in err and err.count("\n") == 1
    assert pq.read_table(tmp_path / "o" / "effects.parquet").to_pylist() == again  # untouched


def test_default_model_ablating_a_tokens_top_neurons_lowers_it_where_they_fire(default_subject, tmp_path):
    """Done-when: for the token-level concepts ' the' and ',', the two neurons of blocks.29.mlp_hidden whose
    down-projection rows promote the token most (logit lens through the model's own norm and unembedding) are
    explained on 320 tokens of the default corpus; ablating them where they fire lowers the token's log-probability
    on average, and the stored effect of one of them equals a from-scratch recomputation (for ' the'; windows of 32
    tokens, to keep the CPU cost down)."""
    s = default_subject
    site = "blocks.29.mlp_hidden"
    st = record(s, Corpus("default"), [site], 320, tmp_path / "s", ctx_len=32, batch_size=10, progress=False)
    d = Neurons.from_subject(s, site)
    down = s.model.model.layers[29].mlp.down_proj
    with torch.no_grad():
        lens = s.model.lm_head(s.model.model.norm(down.weight.t()))  # [neurons, vocab]
    for word in (" the", ","):
        tid = s.tokenizer(word, add_special_tokens=False).input_ids[0]
        units = lens[:, tid].topk(2).indices.tolist()
        out = tmp_path / f"ex{tid}"
        write_tables(out, d, st, site, s.tokenizer, top_n=2, quantile_n=0, random_n=0, units=units, progress=False)
        rows = unit_effects(s, d, out, units=units, windows=2, tokens=[tid]).to_pylist()
        drops = [r["token_dlogp_ablate"][0] for r in rows]
        print(word, units, drops)
        assert sum(drops) / len(drops) < 0, (word, units, drops)
        if word != " the":
            continue
        r = rows[0]
        ex = [e for e in pq.read_table(out / "examples.parquet").to_pylist() if e["unit"] == r["unit"]]
        ex = sorted((e for e in ex if e["kind"] == "top"), key=lambda e: e["rank"])[:2]
        kl, nxt, mean, _ = _from_scratch(s, down, r["unit"], [e["token_ids"] for e in ex], 0.0,
                                         torch.eye(d.n_units), d.encode, pre=True)
        assert r["kl_ablate"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
        assert r["dlogp_next_ablate"] == pytest.approx(nxt, rel=1e-3, abs=1e-6)
        assert r["token_dlogp_ablate"][0] == pytest.approx(float(mean[tid]), rel=1e-3, abs=1e-6)
