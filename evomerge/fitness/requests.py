"""The seam between fitness tasks and model backends: plain request records and the Backend protocol.

Tasks never know which backend answers them; backends never know which task asked. Every backend
(HF transformers, vLLM) answers the same two request kinds, in batches, in request order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class GenerateRequest:
    """Greedy continuation of ``prompt``: at most ``max_new_tokens`` tokens, cut at the first stop string."""

    prompt: str
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Log-probability of ``continuation`` following ``context``."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Loglikelihood:
    """Answer to a LoglikelihoodRequest: summed log-probability (nats) of the continuation's tokens,
    their count, and whether greedy decoding would have produced exactly those tokens."""

    logprob: float
    num_tokens: int
    is_greedy: bool


@runtime_checkable
class Backend(Protocol):
    """A resident model answering batches of requests; its weights can be replaced in place."""

    name: str

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Continuations (without the prompt, stop string excluded), one per request, in order."""
        ...

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """One answer per request, in order."""
        ...

    def load_weights(self, tensors: Mapping[str, object]) -> None:
        """Replace the resident model's weights (HF tensor names) without reloading the engine."""
        ...
