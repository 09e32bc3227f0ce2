"""SAELens interoperability, checked against SAELens itself running in its own environment.

The environment is made on first use (a venv with torch 2.13, sae-lens and sparsify) under the unitscope cache, so
CI and a fresh checkout check the same thing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unitscope import load_dictionary
from unitscope.dictionaries.sae import JumpReLUSAE, TopKSAE
from unitscope.subject import cache_dir

PEERS = ["sae-lens==6.54.12", "eai-sparsify==1.3.3"]
HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def saelens_python() -> Path:
    env = Path(os.environ.get("UNITSCOPE_PEERS_ENV", cache_dir() / "peers" / "env"))
    py = env / "bin" / "python"
    if not (env / ".ready").exists() or (env / ".ready").read_text() != " ".join(PEERS):
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, *PEERS], check=True)
        (env / ".ready").write_text(" ".join(PEERS))
    return py


def test_saelens_and_unitscope_encode_each_others_files_identically(saelens_python, tmp_path):
    torch.manual_seed(1)
    x = torch.randn(64, 24) * 2
    save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    ours = {
        "topk": TopKSAE(24, 80, k=5, metadata={"hook_name": "blocks.0.resid_post", "model_name": "m"}),
        "jumprelu": JumpReLUSAE(24, 80, metadata={"hook_name": "blocks.0.resid_post", "model_name": "m"}),
    }
    for name, sae in ours.items():
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
            if name == "jumprelu":
                sae.log_threshold.copy_((torch.rand(80) * 0.5).log())
        sae.save(tmp_path / f"unitscope_{name}")
    p = subprocess.run([str(saelens_python), str(HERE / "peers" / "saelens_side.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    # SAELens-saved SAEs (random weights, and trained by SAELens' own step), loaded by unitscope, encode as
    # SAELens does
    # and decode those codes, and reconstruct x, as SAELens does
    theirs = load_file(str(tmp_path / "saelens_codes.safetensors"))
    for name in ("topk", "topk_rescaled", "jumprelu", "trained_topk", "trained_jumprelu"):
        d = load_dictionary(tmp_path / f"saelens_{name}")
        with torch.no_grad():
            codes = d.encode(x)
            decoded = d.decode(theirs[name])
            recon = d.reconstruct(x)[1]
        assert 0 < (theirs[name] != 0).float().mean() < 0.9, name  # a real sparse code, not all zero
        assert (codes - theirs[name]).abs().max() < 1e-5, name
        assert ((codes != 0) == (theirs[name] != 0)).all(), name
        scale = theirs[f"{name}.forward"].abs().max()
        assert (decoded - theirs[f"{name}.decode"]).abs().max() < 1e-5 * scale, name
        assert (recon - theirs[f"{name}.forward"]).abs().max() < 1e-5 * scale, name
    # rescale_acts_by_decoder_norm is folded into the weights on load, as SAELens' own fold_W_dec_norm does it
    folded = load_dictionary(tmp_path / "saelens_topk_rescaled").weights()
    raw = load_file(str(tmp_path / "saelens_topk_rescaled" / "sae_weights.safetensors"))
    assert not torch.allclose(raw["W_dec"].norm(dim=1), torch.ones(96), atol=1e-3)  # there was a norm to fold
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(folded[key], theirs[f"topk_rescaled.folded.{key}"], rtol=1e-5, atol=1e-6), key

    # unitscope-saved SAEs, loaded by SAELens, encode and decode as unitscope does
    by_saelens = load_file(str(tmp_path / "unitscope_codes_by_saelens.safetensors"))
    for name, sae in ours.items():
        codes = sae.encode(x).detach()
        assert (by_saelens[f"unitscope_{name}"] - codes).abs().max() < 1e-5, name
        assert (by_saelens[f"unitscope_{name}.recon"] - sae.decode(codes).detach()).abs().max() < 1e-4, name
        assert (by_saelens[f"unitscope_{name}.forward"] - sae(x).detach()).abs().max() < 1e-4, name


def test_sparsify_saved_coders_encode_identically(saelens_python, tmp_path):
    torch.manual_seed(2)
    x = torch.randn(64, 24) * 2
    save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    p = subprocess.run([str(saelens_python), str(HERE / "peers" / "sparsify_side.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = load_file(str(tmp_path / "sparsify_codes.safetensors"))
    for name in ("sae", "transcoder", "narrow_transcoder"):
        d = load_dictionary(tmp_path / f"sparsify_{name}")
        codes, recon = d.reconstruct(x)
        assert (d.d_in, d.d_out) == (24, 20 if name == "narrow_transcoder" else 24), name
        assert recon.shape == theirs[f"{name}.out"].shape, name
        assert (codes.detach() - theirs[name]).abs().max() < 1e-5, name
        assert (recon.detach() - theirs[f"{name}.out"]).abs().max() < 1e-4, name
    for name in ("transcoder", "narrow_transcoder"):
        assert load_dictionary(tmp_path / f"sparsify_{name}").architecture == "topk_skip_transcoder"
