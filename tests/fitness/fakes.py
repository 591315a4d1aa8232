"""A deterministic stand-in for a model backend: answers come from tables, not from a model.

It sits beside the real HF and vLLM backends for task-layer tests; it does not replace them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from evomerge.fitness.requests import GenerateRequest, Loglikelihood, LoglikelihoodRequest


class FakeBackend:
    """Generations looked up by prompt (or computed by ``answer``); log-likelihoods computed by ``score``
    from (context, continuation), with one token per whitespace-separated word of the continuation."""

    name = "fake"

    def __init__(
        self,
        answers: Mapping[str, str] | None = None,
        answer: Callable[[str], str] | None = None,
        score: Callable[[str, str], float] | None = None,
    ):
        self.answers = dict(answers or {})
        self.answer = answer
        self.score = score or (lambda context, continuation: -float(len(continuation)))
        self.calls: list[tuple[str, int]] = []
        self.requests: list[object] = []

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        self.calls.append(("generate", len(requests)))
        self.requests += requests
        out = []
        for r in requests:
            text = self.answers.get(r.prompt, "") if self.answer is None else self.answer(r.prompt)
            for s in r.stop:  # as a real backend would: cut before the first stop string
                text = text.split(s, 1)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        self.calls.append(("loglikelihood", len(requests)))
        self.requests += requests
        return [
            Loglikelihood(self.score(r.context, r.continuation), max(len(r.continuation.split()), 1), False)
            for r in requests
        ]

    def load_weights(self, tensors) -> None:
        self.calls.append(("load_weights", len(tensors)))
