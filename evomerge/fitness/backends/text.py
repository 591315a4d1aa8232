"""Text rules every backend shares: the context/continuation token boundary and stop strings."""

from __future__ import annotations

from collections.abc import Sequence


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (excluding) the earliest occurrence of any stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class PairEncoder:
    """Token ids for log-likelihood requests: context (with special tokens) and continuation (without),
    encoded separately and concatenated; trailing whitespace of the context moves to the continuation.
    An empty context becomes ``empty_prefix`` (e.g. [bos])."""

    def __init__(self, tokenizer, empty_prefix: Sequence[int]):
        self.tokenizer = tokenizer
        self.empty_prefix = list(empty_prefix)

    def context(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(ids) if ids else list(self.empty_prefix)

    def continuation(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        return self.context(context), self.continuation(continuation)

    def prompt(self, text: str, max_new_tokens: int, max_length: int) -> list[int]:
        """A generation prompt's ids, cut on the left so that ``max_new_tokens`` fit in ``max_length``."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        keep = max_length - max_new_tokens
        if keep < 1:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room for the prompt within max_length {max_length}"
            )
        return self.context(text)[-keep:]
