"""The static report: text from a hostile corpus stays text in a real browser (headless Chromium from the
file system), and the report directory is only ever replaced whole."""

import json
import shutil
import tempfile

import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_explain import check_crashes

from unitscope import Corpus, load_subject, record
from unitscope.dictionaries.sae import TopKSAE
from unitscope.errors import UnitscopeError
from unitscope.explain import logit_lens, write_tables
from unitscope.report import write_report

SITE = "blocks.1.resid_post"
# lower case on purpose: the old index put a lower-cased copy of tokens into its inline script
SCRIPT = "</script><script>window.pwned=1</script>"
IMG = "<img src=x onerror=window.pwned=2>"
PROSE = "The for statement iterates over the items of any sequence, in the order that they appear."


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A tiny model whose tokenizer has the two payloads as single tokens, a corpus full of them, and a
    dictionary whose units 0 and 1 promote them in the logit lens, explained into tables."""
    root = tmp_path_factory.mktemp("hostile")
    tok = tiny_tokenizer()
    tok.add_tokens([SCRIPT, IMG])
    subject = load_subject(tiny_model("llama", len(tok)), tokenizer=tok)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"{PROSE} {SCRIPT} {i} & {IMG} <b>bold</b> \u2028 end." for i in range(40)))
    store = record(subject, Corpus(str(corpus)), [SITE], 800, root / "store", ctx_len=16, batch_size=4,
                   shard_tokens=160, progress=False)
    torch.manual_seed(0)
    d = TopKSAE(32, 8, k=2, metadata={"hook_name": SITE})
    ids = tok.convert_tokens_to_ids([SCRIPT, IMG])
    with torch.no_grad():
        d.W_dec[:2] = subject.model.lm_head.weight[ids]
    lens = logit_lens(subject, d)
    assert lens["promoted_tokens"][0][0] == SCRIPT and lens["promoted_tokens"][1][0] == IMG
    write_tables(root / "explain", d, store, SITE, tok, lens=lens, top_n=3, progress=False)
    examples = pq.read_table(root / "explain" / "examples.parquet").to_pylist()
    for markup in (SCRIPT, IMG, "<b>bold</b>"):
        assert any(markup in "".join(e["tokens"]) for e in examples)
    return root, d, store, tok


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="unitscope-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"  # Debian's build; nothing is ever downloaded
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


PROBE = """return {pwned: typeof window.pwned, imgs: document.querySelectorAll('img').length,
scripts: document.scripts.length, bold: document.querySelectorAll('b').length,
rows: document.querySelectorAll('#tb tr').length, text: document.body.textContent,
fetched: performance.getEntriesByType('resource').map(e => e.name)}"""


def test_hostile_text_stays_text_in_chromium(hostile, browser, tmp_path):
    root, d, store, tok = hostile
    index = write_report(tmp_path / "r", root / "explain", f"title {SCRIPT}", info={"model": IMG})
    browser.get(index.as_uri())
    page = browser.execute_script(PROBE)
    assert page["pwned"] == "undefined" and page["fetched"] == []  # nothing loaded from anywhere
    assert (page["imgs"], page["scripts"], page["bold"]) == (0, 1, 0)  # only the report's own script
    assert page["rows"] == d.n_units  # and it ran: the table is filled from the inline data
    assert SCRIPT in page["text"] and IMG in page["text"]  # shown as text (title, info, promoted tokens)
    assert browser.title == f"title {SCRIPT}"

    box = browser.find_element("id", "q")  # searching for the payload filters the table, still as text
    box.send_keys("window.pwned=1")
    page = browser.execute_script(PROBE)
    assert 1 <= page["rows"] < d.n_units and page["imgs"] == 0 and page["pwned"] == "undefined"

    examples = pq.read_table(root / "explain" / "examples.parquet").to_pylist()
    for unit in range(d.n_units):
        browser.get((tmp_path / "r" / "units" / f"{unit}.html").as_uri())
        page = browser.execute_script(PROBE)
        assert page["pwned"] == "undefined" and page["fetched"] == []
        assert (page["imgs"], page["scripts"], page["bold"]) == (0, 0, 0)
        if unit < 2:
            assert (SCRIPT, IMG)[unit] in page["text"]  # the promoted token, as text
        for e in examples:  # every example's window appears as the characters it is made of
            if e["unit"] == unit:
                assert "".join(e["tokens"]) in page["text"]


def test_report_is_replaced_whole_at_any_crash(hostile, tmp_path, monkeypatch):
    root, d, store, tok = hostile
    other = tmp_path / "other-explain"  # a second explanation: fewer examples, other logit lens
    write_tables(other, TopKSAE(32, 8, k=2, metadata={"hook_name": SITE}), store, SITE, tok, top_n=1,
                 progress=False)
    for exchange in (True, False):
        points = check_crashes(monkeypatch, tmp_path / str(exchange),
                               lambda out: write_report(out, root / "explain", "old"),
                               lambda out: write_report(out, other, "new"), exchange)
        assert points >= d.n_units + 2  # every page, the index, then the swap


def test_report_refuses_a_directory_holding_other_files(hostile, tmp_path):
    root = hostile[0]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    with pytest.raises(UnitscopeError, match="other files"):
        write_report(tmp_path / "r", root / "explain", "t")
    assert (tmp_path / "r" / "keep.txt").read_text() == "mine"


def test_script_json_round_trips_and_never_closes_a_script():
    from unitscope.report.static import script_json

    value = {"t": [SCRIPT, IMG, "<!--", "a\u2028b\u2029c", "&amp;", "ünï"]}
    text = script_json(value)
    assert not any(c in text for c in "<>&\u2028\u2029")
    assert json.loads(text) == value


def test_the_runs_comparison_is_shown_with_its_plot_and_stays_text(hostile, browser, tmp_path):
    """A run's compare rows and plot on a dictionary's index: the plot is the report's own copy (it loads from the
    report folder), the other dictionaries are links, and a hostile dictionary name is text, never markup."""
    from unitscope.compare import plot_png

    root = hostile[0]
    rows = [{"dictionary": "topk-32-k2", "kind": "topk", "units": 32, "l0": 2.0, "fvu": 0.25},
            {"dictionary": SCRIPT, "kind": IMG, "units": 8, "l0": 8.0, "fvu": 0.0, "report": f"../{IMG}/index.html"}]
    plot = tmp_path / "compare.png"
    plot.write_bytes(plot_png(rows))
    index = write_report(tmp_path / "report" / "topk-32-k2", root / "explain", "t", comparison=rows,
                         comparison_plot=plot)
    plot.unlink()  # the report keeps its own copy
    browser.get(index.as_uri())
    page = browser.execute_script(PROBE.replace(
        "return {", "return {loaded: [...document.images].map(i => i.complete && i.naturalWidth), "
                    "links: [...document.querySelectorAll('a')].map(a => a.getAttribute('href')), "
                    "strong: [...document.querySelectorAll('tr')].filter(r => r.style.fontWeight)"
                    ".map(r => r.cells[0].textContent), ", 1))
    assert page["pwned"] == "undefined" and page["scripts"] == 1
    assert page["imgs"] == 1 and page["loaded"][0] > 0  # the plot loaded: the report's own copy (the run's is gone)
    assert page["fetched"] == []
    assert SCRIPT in page["text"] and IMG in page["text"]
    assert page["strong"] == ["topk-32-k2"] and page["bold"] == 0  # this dictionary's row; the other is a link
    assert any(h and h.endswith("/index.html") and h.startswith("..") for h in page["links"])
