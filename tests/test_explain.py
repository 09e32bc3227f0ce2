"""Explanation tables agree with brute-force encoding of the whole store; the report renders them."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from unitscope import Corpus, record
from unitscope.corpus import training_mask
from unitscope.dictionaries.sae import TopKSAE
from unitscope.explain import logit_lens, write_tables
from unitscope.report import write_report

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def explained(tmp_path_factory, llama_subject):
    root = tmp_path_factory.mktemp("ex")
    st = record(llama_subject, Corpus("default"), [SITE], 1000, root / "s", ctx_len=16, batch_size=4,
                shard_tokens=160, progress=False)
    torch.manual_seed(0)
    d = TopKSAE(32, 24, k=3, metadata={"hook_name": SITE})
    write_tables(root / "e", d, st, SITE, llama_subject.tokenizer, lens=logit_lens(llama_subject, d), top_n=5,
                 progress=False)
    return root, st, d


def test_tables_match_brute_force(explained, llama_subject):
    root, st, d = explained
    units = pq.read_table(root / "e" / "units.parquet").to_pydict()
    examples = pq.read_table(root / "e" / "examples.parquet").to_pylist()
    x = torch.cat([st.acts(SITE, i) for i in range(st.n_shards)])
    mask = training_mask(st.column("tokens"), st.column("pos"), np.asarray(st.manifest["specials"]))
    with torch.no_grad():
        codes = d.encode(x) * torch.from_numpy(mask)[:, None]
    freq = ((codes > 0).sum(0).float() / mask.sum()).numpy()
    assert np.allclose(units["frequency"], freq)
    assert np.allclose(units["max_activation"], codes.max(0).values.numpy(), rtol=1e-5)
    for unit in range(d.n_units):
        ex = sorted((e for e in examples if e["unit"] == unit), key=lambda e: e["rank"])
        if codes[:, unit].max() <= 0:
            assert not ex
            continue
        per_window = codes[:, unit].view(-1)
        n_windows = -(-len(per_window) // 16)  # the last window is truncated
        wmax = torch.stack([per_window[w * 16:(w + 1) * 16].max() for w in range(n_windows)])
        best = wmax.topk(len(ex)).values.numpy()
        assert np.allclose([e["max_activation"] for e in ex], best, rtol=1e-5)
        first = ex[0]
        w = int(first["window"])
        assert list(first["token_ids"]) == st.column("tokens")[w * 16:(w + 1) * 16].tolist()
        assert np.allclose(first["acts"], codes[w * 16:(w + 1) * 16, unit].numpy(), atol=1e-3)
    assert len(units["promoted_tokens"][0]) == 10


def test_report_opens_from_the_file_system(explained, tmp_path):
    root, _, d = explained
    index = write_report(tmp_path / "r", root / "e", "test report")
    html = index.read_text()
    assert "sortBy('frequency')" in html and "http" not in html.split("<script>")[0]
    pages = list((tmp_path / "r" / "units").glob("*.html"))
    assert len(pages) == d.n_units
    assert "Top activating examples" in (tmp_path / "r" / "units" / "0.html").read_text()
