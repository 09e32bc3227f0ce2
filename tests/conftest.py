"""Shared fixtures: tiny random HF models built here (fast), and the real default model (integration)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def tiny_tokenizer():
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model(family: str, vocab: int):
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return tf.LlamaForCausalLM(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=256)
        return tf.GPT2LMHeadModel(cfg)
    if family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=256)
        return tf.GPTNeoXForCausalLM(cfg)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session", params=["llama", "gpt2", "gpt_neox"])
def tiny_subject(request, tokenizer):
    from unitscope import load_subject

    return load_subject(tiny_model(request.param, len(tokenizer)), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def llama_subject(tokenizer):
    from unitscope import load_subject

    return load_subject(tiny_model("llama", len(tokenizer)), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def sharp_subject(tokenizer):
    """A tiny Llama with larger weights than `llama_subject`, so its next-token distribution can move by KL 0.5
    (steering to the semi-NMF paper's targets)."""
    import transformers as tf

    from unitscope import load_subject

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3)
    return load_subject(tf.LlamaForCausalLM(cfg), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved as a local model directory, for the CLI (loads like any HF directory)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def default_subject():
    from unitscope import load_subject

    return load_subject("default")


@contextlib.contextmanager
def serving(app):
    """A real uvicorn server for the ASGI `app` on a free loopback port, in a thread -> its port; stopped after."""
    import threading
    import time

    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield srv.servers[0].sockets[0].getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(10)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run `python -m unitscope ARGS` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "unitscope", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def calling_first(hook, fn):
    """`fn` wrapped so that `hook()` runs before every call: e.g. a snapshot before each filesystem step."""
    def wrapped(*a, **kw):
        hook()
        return fn(*a, **kw)
    return wrapped


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's build; nothing is ever downloaded) through Selenium, its console kept for
    `driver.get_log("browser")`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="unitscope-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1200,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
