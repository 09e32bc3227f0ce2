"""An LLM judge of concept presence for steered text, as in the semi-NMF paper's causal evaluation: a chat model
rates each generation 0 (the concept is absent), 1 (present but weak or awkward) or 2 (clearly present).

The judge talks through the labelling backends (`label.client`: `OpenAIEndpoint` for any OpenAI-compatible
server, `HFChat` for a local chat model), so retries and error reporting are theirs. The prompt asks for the
rating alone in the form `Rating: [[N]]` (short answers: a judge call per generation must stay cheap on CPU);
an answer without a rating in that form, or a request that still fails after its retries, scores NaN and the
answer (or the error) is kept beside the rating, so every score can be checked against what the judge said.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..label.client import EndpointError

PROMPT_TEMPLATE = (
    "You are an impartial judge. Decide whether the concept below appears in the text fragment below. Judge only "
    "whether the concept is there, not grammar, fluency or logic.\n"
    "Rate it 0 if the concept is absent, 1 if it is present but only weakly or awkwardly, and 2 if it is clearly "
    "present.\n"
    "Answer with the rating alone, exactly in this form: Rating: [[N]]\n\n"
    "Concept: {concept}\n\n"
    "Text fragment:\n{text}\n")
RATING = re.compile(r"rating\s*:\s*\[*\s*([0-2])(?![0-9.])\s*\]*", re.IGNORECASE)  # "Rating: 12" is no rating


def parse_rating(answer: str) -> float:
    """The first `Rating: [[N]]` (N in 0..2; brackets optional) in the answer, else NaN."""
    m = RATING.search(answer or "")
    return float(m.group(1)) if m else math.nan


class ConceptJudge:
    """Rates generations for a concept through a chat backend (`complete(messages, max_tokens)` -> Answer)."""

    def __init__(self, backend: Any, max_tokens: int = 16):
        self.backend, self.max_tokens = backend, max_tokens
        self.model = backend.resolve_model()  # fails here, in one sentence, if the endpoint cannot be used
        self.prompt_template = PROMPT_TEMPLATE

    def prompt(self, concept: str, text: str) -> str:
        return self.prompt_template.format(concept=concept, text=text.strip())

    def rate(self, concept: str, text: str) -> tuple[float, str]:
        """(rating 0-2 or NaN, the judge's answer or the error that stopped it)."""
        try:
            answer = self.backend.complete([{"role": "user", "content": self.prompt(concept, text)}],
                                           self.max_tokens).text
        except EndpointError as e:
            return math.nan, f"error: {e}"
        return parse_rating(answer), answer
