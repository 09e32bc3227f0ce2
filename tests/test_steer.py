"""Steering: the alpha search hits each target KL (recomputed by hand), generations are reproducible and equal
HF generate() with the same seed, bad input is refused in one sentence, the CLI writes F.json."""

import json

import pytest
import torch
from conftest import run_cli

from unitscope import UnitscopeError, load_subject
from unitscope.causal.steer import KL_TARGETS, NEUTRAL_PROMPT, find_alpha, steer, steering_direction
from unitscope.cli import main
from unitscope.dictionaries.linear import PCA
from unitscope.dictionaries.sae import TopKSAE

SITE = "blocks.1.resid_post"
PROMPT = "The function returns"


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(5)
    return TopKSAE(32, 24, k=4, metadata={"hook_name": SITE})


def kl_by_hand(subject, site, vector, prompt=NEUTRAL_PROMPT):
    """KL(p_clean || p_steered) at the prompt's last token, with a raw hook that adds `vector` everywhere."""
    ids = subject.tokenizer(prompt, return_tensors="pt").input_ids
    clean = subject.logits(ids)[0, -1].double()
    with subject.intervene([subject.intervention(site, lambda x: x + vector)]):
        steered = subject.logits(ids)[0, -1].double()
    return float(torch.nn.functional.kl_div(steered.log_softmax(-1), clean.log_softmax(-1), log_target=True,
                                            reduction="sum"))


@pytest.mark.parametrize("sign", [1, -1])
def test_the_alpha_search_hits_every_target_kl(sharp_subject, sae, sign):
    site, vec, norm = steering_direction(sae, 3)
    assert site == SITE and torch.allclose(vec * norm, sae.W_dec[3].detach())
    for target in KL_TARGETS:
        found = find_alpha(sharp_subject, site, vec, target, sign=sign)
        assert found["alpha"] * sign > 0
        assert abs(found["kl"] - target) <= 0.02 * target
        assert kl_by_hand(sharp_subject, site, found["alpha"] * vec) == pytest.approx(found["kl"], rel=1e-4)
        assert found["search"][-1] == {"alpha": found["alpha"], "kl": found["kl"]}


def test_steer_is_reproducible_and_its_baseline_is_plain_generate(sharp_subject, sae):
    a = steer(sharp_subject, PROMPT, dictionary=sae, unit=3, kl=0.5, n=3, max_new_tokens=6, seed=11)
    b = steer(sharp_subject, PROMPT, dictionary=sae, unit=3, kl=0.5, n=3, max_new_tokens=6, seed=11)
    assert a["baseline"] == b["baseline"] and a["steered"] == b["steered"] and a["alpha"] == b["alpha"]
    assert len(a["steered"]) == 3 and a["steered"] != a["baseline"]
    ids = sharp_subject.tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(11)
    out = sharp_subject.model.generate(input_ids=ids.repeat(3, 1), attention_mask=torch.ones(3, ids.shape[1],
                                       dtype=torch.long), do_sample=True, top_k=None, top_p=None, max_new_tokens=6,
                                       pad_token_id=sharp_subject.tokenizer.eos_token_id)
    assert a["baseline"] == [sharp_subject.tokenizer.decode(r[ids.shape[1]:], skip_special_tokens=True) for r in out]
    # the recorded intervention replays the steered generations
    from unitscope.causal.interventions import intervention_from_json
    from unitscope.causal.steer import generate

    replay = generate(sharp_subject, PROMPT, [intervention_from_json(a["intervention"])], 3, 6, 11)
    assert replay == a["steered"]
    assert json.loads(json.dumps(a)) == a  # plain JSON


def test_a_target_no_alpha_reaches_is_refused(llama_subject, sae):
    # conftest's tiny Llama has near-flat logits: its next-token KL saturates near 0.012
    with pytest.raises(UnitscopeError, match=r"no alpha reaches next-token KL 0\.5 .* the largest KL found was 0\.0"):
        steer(llama_subject, PROMPT, dictionary=sae, unit=3, kl=0.5, n=1, max_new_tokens=2)


def test_bad_steering_input_is_refused_in_one_sentence(sharp_subject, sae):
    with pytest.raises(UnitscopeError, match="unit 24 is out of range: this topk dictionary has 24 units"):
        steer(sharp_subject, PROMPT, dictionary=sae, unit=24, alpha=1.0)
    with pytest.raises(UnitscopeError, match="site 'blocks.0.resid_post' is not where this topk dictionary writes"):
        steer(sharp_subject, PROMPT, dictionary=sae, unit=2, site="blocks.0.resid_post", alpha=1.0)
    with pytest.raises(UnitscopeError, match="alpha 1e\\+39 makes the model's logits non-finite"):
        steer(sharp_subject, PROMPT, dictionary=sae, unit=2, alpha=1e39)
    with pytest.raises(UnitscopeError, match="position 50 is past the sequence: the prompt and its continuation has"):
        steer(sharp_subject, PROMPT, dictionary=sae, unit=2, alpha=1.0, positions=[0, 50], max_new_tokens=4)
    with pytest.raises(UnitscopeError, match="seed must be below 2\\*\\*63"):
        steer(sharp_subject, PROMPT, dictionary=sae, unit=3, alpha=1.0, seed=2**70)
    with pytest.raises(UnitscopeError, match="give exactly one of alpha"):
        steer(sharp_subject, PROMPT, dictionary=sae, unit=2, alpha=1.0, kl=0.1)
    with pytest.raises(UnitscopeError, match="the target KL must be a number > 0"):
        steer(sharp_subject, PROMPT, dictionary=sae, unit=2, kl=-0.1)


def test_the_steer_command_writes_its_record(tiny_model_dir, tmp_path, capsys):
    d = TopKSAE(32, 24, k=4, metadata={"hook_name": SITE, "model_spec": str(tiny_model_dir)})
    d.save(tmp_path / "sae")
    out = tmp_path / "steer.json"
    r = run_cli("steer", "--dictionary", tmp_path / "sae", "--unit", 3, "--alpha", 6.0, "--prompt", PROMPT, "--n", 2,
                "--max-new-tokens", 5, "--seed", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["alpha"] == 6.0 and len(rec["baseline"]) == len(rec["steered"]) == 2 and rec["seed"] == 3
    assert rec["site"] == SITE and rec["unit"] == 3 and rec["model"] == str(tiny_model_dir.resolve())
    subject = load_subject(str(tiny_model_dir))
    again = steer(subject, PROMPT, dictionary=d, unit=3, alpha=6.0, n=2, max_new_tokens=5, seed=3)
    assert (again["baseline"], again["steered"], again["kl"]) == (rec["baseline"], rec["steered"], rec["kl"])
    direction = tmp_path / "dir.json"
    direction.write_text(json.dumps([1.0] * 32))
    for args, message in [
        (["--unit", "24", "--alpha", "1"], "unit 24 is out of range"),
        (["--unit", "3", "--kl", "0.5"], "no alpha reaches next-token KL 0.5"),
        (["--direction", str(direction), "--site", "blocks.0.resid_post", "--alpha", "1"],
         "site 'blocks.0.resid_post' is not where this topk dictionary writes"),
        (["--unit", "3", "--alpha", "1", "--positions", "0,99"], "position 99 is past the sequence"),
        (["--unit", "3", "--alpha", "1e39"], "makes the model's logits non-finite"),
    ]:
        code = main(["steer", "--dictionary", str(tmp_path / "sae"), "--prompt", PROMPT, "--out",
                     str(tmp_path / "bad.json"), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
        assert not (tmp_path / "bad.json").exists()


def test_a_pca_direction_reaches_kl_0_1_on_the_default_model(default_subject):
    site = "blocks.6.resid_post"
    text = ["The cat sat on the mat and looked out of the window.", "Stock markets fell sharply on Monday.",
            "def add(a, b):\n    return a + b", "She sang a song about the sea and the stars."]
    rows = []
    for t in text:
        ids = default_subject.tokenizer(t, return_tensors="pt").input_ids
        rows.append(default_subject.collect(ids, [site])[site][0])
    pca = PCA.fit([torch.cat(rows)], rows[0].shape[-1], 4, {"hook_name": site})
    rec = steer(default_subject, "My favourite food is", dictionary=pca, unit=0, kl=0.1, n=1, max_new_tokens=4)
    assert abs(rec["kl"] - 0.1) <= 0.002
    vec = torch.tensor(rec["intervention"]["direction"]) * rec["alpha"]
    assert kl_by_hand(default_subject, site, vec) == pytest.approx(rec["kl"], rel=1e-3)
