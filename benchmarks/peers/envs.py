"""The peers' virtual environments, made on first use and cached, so the benchmark runs from a fresh checkout.

One venv per peer (their dependency pins differ: dictionary-learning wants nnsight 0.3, SAELens wants
transformer-lens) under unitscope's cache directory. torch is installed first and pinned, since a bare
`pip install sae-lens` would pull a multi-GB CUDA build of torch. A `.ready` file names exactly what was
installed; a different pin list (or a half-made env after a kill) rebuilds the env.

    python benchmarks/peers/envs.py            # make (or check) all three and print their interpreters
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from unitscope.subject import cache_dir

TORCH = "torch==2.13.0"
PEERS: dict[str, list[str]] = {
    "sparsify": ["eai-sparsify==1.3.3"],
    "saelens": ["sae-lens==6.54.12"],
    "dictionary_learning": ["dictionary-learning==0.1.0"],
}
MODULES = {"sparsify": "sparsify", "saelens": "sae_lens", "dictionary_learning": "dictionary_learning"}
# nnsight (a dictionary-learning dependency) pulls PyPI's torchvision, a CUDA build whose extension does not load
# against CPU torch and then breaks `import transformers`; nothing the benchmark runs uses torchvision.
REMOVE = {"dictionary_learning": ["torchvision"]}


def envs_root() -> Path:
    """$UNITSCOPE_BENCH_ENVS, else <unitscope cache>/peers/bench."""
    return Path(os.environ.get("UNITSCOPE_BENCH_ENVS") or cache_dir() / "peers" / "bench")


def peer_python(peer: str, root: Path | None = None, log=print) -> Path:
    """The interpreter of `peer`'s venv, creating and filling the venv first when it is missing or stale."""
    env = (root or envs_root()) / peer
    py = env / "bin" / "python"
    want = " ".join([TORCH, *PEERS[peer], *(f"-{r}" for r in REMOVE.get(peer, []))])
    ready = env / ".ready"
    if ready.is_file() and ready.read_text() == want and py.is_file():
        return py
    log(f"peer {peer}: creating its environment at {env} ({want}); this takes a few minutes once")
    if env.exists():
        shutil.rmtree(env)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)  # first: the CPU build, before a peer can pull a CUDA one
    subprocess.run([*pip, TORCH, *PEERS[peer]], check=True)  # torch named again so pip keeps that build
    if REMOVE.get(peer):
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", *REMOVE[peer]], check=True)
    subprocess.run([str(py), "-c", f"import {MODULES[peer]}"], check=True)  # a broken env fails here, not later
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(want)
    os.replace(tmp, ready)
    return py


def main() -> None:
    for peer in PEERS:
        print(peer, peer_python(peer))


if __name__ == "__main__":
    main()
