"""The prompts of the explainer and of the two scorers, and how their answers are read.

Firing tokens are shown delphi-style: a run of adjacent firing tokens is wrapped as <<like this>>. The
explainer writes one short phrase; each scorer asks one yes/no question about one excerpt, so every
window gets its own answer (and its own log-probabilities) rather than a list the model could miscount.
`PROMPT_VERSION` changes whenever a template does, and is stored with every label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PROMPT_VERSION = "unitscope-label-1"

EXPLAIN_SYSTEM = (
    "You explain what a unit inside a language model responds to. You are shown text excerpts in which the "
    "tokens where the unit fires are marked like <<this>>. Reply with one short phrase that says what the marked "
    "tokens have in common, for example: the word \"the\", closing brackets in code, years, words about water. "
    "Reply with the phrase only."
)
EXPLAIN_USER = "Excerpts:\n{examples}\n\nWhat do the marked tokens have in common? Reply with one short phrase."

DETECTION_SYSTEM = "You decide whether a text excerpt contains a described feature. Answer Yes or No."
DETECTION_USER = ("Feature: {label}\n\nExcerpt: {text}\n\n"
                  "Does the excerpt contain the feature? Answer Yes or No.")

FUZZING_SYSTEM = ("You decide whether the marked tokens of a text excerpt, marked like <<this>>, are examples of "
                  "a described feature. Answer Yes or No.")
FUZZING_USER = ("Feature: {label}\n\nExcerpt: {text}\n\n"
                "Are the marked tokens examples of the feature? Answer Yes or No.")

TEMPLATES = {"explain_system": EXPLAIN_SYSTEM, "explain_user": EXPLAIN_USER,
             "detection_system": DETECTION_SYSTEM, "detection_user": DETECTION_USER,
             "fuzzing_system": FUZZING_SYSTEM, "fuzzing_user": FUZZING_USER}


def render(tokens: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    """The excerpt's text with each run of marked tokens wrapped in << >> (markers kept outside whitespace)."""
    out: list[str] = []
    run: list[str] = []

    def close() -> None:
        if run:
            text = "".join(run)
            lead = text[: len(text) - len(text.lstrip())]
            body = text.strip()
            trail = text[len(lead) + len(body):]
            out.append(f"{lead}<<{body}>>{trail}" if body else text)
            run.clear()

    for i, tok in enumerate(tokens):
        if marked is not None and marked[i]:
            run.append(tok)
        else:
            close()
            out.append(tok)
    close()
    return " ".join("".join(out).split())  # one line: newlines and tabs as single spaces


def explain_messages(examples: Sequence[str]) -> list[dict[str, str]]:
    listed = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(examples))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": EXPLAIN_USER.format(examples=listed)}]


def score_messages(scorer: str, label: str, text: str) -> list[dict[str, str]]:
    system, user = (DETECTION_SYSTEM, DETECTION_USER) if scorer == "detection" else (FUZZING_SYSTEM, FUZZING_USER)
    return [{"role": "system", "content": system}, {"role": "user", "content": user.format(label=label, text=text)}]


_PREFIX = re.compile(r"^(explanation|answer|label|feature|phrase)\s*:\s*", re.IGNORECASE)


def parse_explanation(text: str, limit: int = 200) -> str | None:
    """The phrase in an explainer's reply (its first non-empty line, without a leading 'Explanation:' or
    quotes), or None when there is none."""
    for line in text.splitlines():
        line = _PREFIX.sub("", line.strip().lstrip("#*-> ").strip())
        line = line.strip().strip("\"'`*").strip()
        if line:
            return line[:limit]
    return None


_YES_NO = re.compile(r"^[^a-z]*(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool | None:
    """True for an answer that starts with yes, False for no, None for anything else."""
    m = _YES_NO.match(text.strip())
    return None if m is None else m.group(1).lower() == "yes"


def p_yes(top_logprobs: list[dict[str, float]] | None) -> float | None:
    """P(yes) / (P(yes) + P(no)) at the first generated position whose top tokens include a yes or a no
    (any case or surrounding space); None where the server gave no log-probabilities or neither word."""
    import math

    for pos in top_logprobs or []:
        yes = no = 0.0
        for tok, lp in pos.items():
            word = tok.strip().strip(".,!:;\"'*").lower()
            if word == "yes":
                yes += math.exp(lp)
            elif word == "no":
                no += math.exp(lp)
        if yes + no > 0:
            return yes / (yes + no)
    return None
