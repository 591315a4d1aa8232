"""Pure grading functions: answer extraction, normalization, matching, and the per-item scores.

No model and no task config here: plain strings and numbers in, plain values out, so every mode is
testable on hand-written text.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence

from evomerge.fitness.backends.text import cut_at_stop

EXTRACT_MODES = ("regex", "last_number", "first_line", "full")
NORMALIZATIONS = ("strip", "lowercase", "remove_punctuation", "remove_whitespace")
MATCH_MODES = ("exact", "numeric")

# A number as people write it: optional sign, thousands separators, decimals, exponent. A minus sign
# directly after a word character or ')' is an operator ("5-3" holds 5 and 3), not a sign.
_NUMBER = r"(?:(?<![\w)])[-+])?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_WHOLE_NUMBER_RE = re.compile(rf"\s*\$?\s*({_NUMBER})\s*%?\.?\s*")


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """Cut ``text`` before the earliest occurrence of any stop string (backends should already have)."""
    return cut_at_stop(text, list(stop))[0]


def extract_regex(text: str, pattern: str | re.Pattern[str], group: int | str = 1) -> str | None:
    """The given group of the first match of ``pattern`` in ``text``; None without a match."""
    m = re.search(pattern, text)
    return None if m is None else m.group(group)


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (e.g. '1,234.5', '-3', '.5', '2e3'); None if there is none."""
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def first_line(text: str) -> str:
    """The first line that is not blank (models often open with a newline); '' for blank text."""
    for line in text.splitlines():
        if line.strip():
            return line
    return ""


def extract_answer(text: str, mode: str, pattern: str | None = None, group: int | str = 1) -> str | None:
    """Apply one extraction mode (see EXTRACT_MODES); None when the answer cannot be found."""
    if mode == "full":
        return text
    if mode == "first_line":
        return first_line(text)
    if mode == "last_number":
        return last_number(text)
    if mode == "regex":
        if pattern is None:
            raise ValueError("extract mode 'regex' needs a pattern")
        return extract_regex(text, pattern, group)
    raise ValueError(f"unknown extract mode {mode!r} (allowed: {', '.join(EXTRACT_MODES)})")


def normalize(text: str, steps: Iterable[str]) -> str:
    """Apply normalization steps in a fixed order (lowercase, punctuation, whitespace, strip), whatever
    order they are listed in, so that a config's list order cannot change a score.

    remove_punctuation drops every Unicode punctuation character (category P*); remove_whitespace drops
    all whitespace, including inside the text.
    """
    wanted = set(steps)
    unknown = wanted - set(NORMALIZATIONS)
    if unknown:
        raise ValueError(f"unknown normalization {sorted(unknown)} (allowed: {', '.join(NORMALIZATIONS)})")
    if "lowercase" in wanted:
        text = text.lower()
    if "remove_punctuation" in wanted:
        text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    if "remove_whitespace" in wanted:
        text = "".join(text.split())
    if "strip" in wanted:
        text = text.strip()
    return text


def parse_number(text: str) -> float | None:
    """A finite float if ``text`` is one number (allowing '$', '%', a trailing '.', thousands commas)."""
    m = _WHOLE_NUMBER_RE.fullmatch(text)
    if m is None:
        return None
    value = float(m.group(1).replace(",", ""))
    return value if math.isfinite(value) else None


def match_exact(prediction: str, target: str) -> bool:
    """String equality (normalize both sides first)."""
    return prediction == target


def match_numeric(prediction: str, target: str, tolerance: float = 0.0) -> bool:
    """Both sides parse as numbers and differ by at most ``tolerance`` (absolute)."""
    a, b = parse_number(prediction), parse_number(target)
    return a is not None and b is not None and abs(a - b) <= tolerance


def grade_generation(
    output: str,
    target: str,
    *,
    extract: str = "full",
    pattern: str | None = None,
    group: int | str = 1,
    steps: Sequence[str] = ("strip",),
    match: str = "exact",
    tolerance: float = 0.0,
) -> tuple[float, str | None]:
    """Score one generated answer: (1.0 or 0.0, the normalized extracted answer or None if none found).

    The target is normalized with the same steps but never extracted from: it is the answer itself.
    """
    answer = extract_answer(output, extract, pattern, group)
    if answer is None:
        return 0.0, None
    answer = normalize(answer, steps)
    gold = normalize(target, steps)
    if match == "exact":
        ok = match_exact(answer, gold)
    elif match == "numeric":
        ok = match_numeric(answer, gold, tolerance)
    else:
        raise ValueError(f"unknown match mode {match!r} (allowed: {', '.join(MATCH_MODES)})")
    return (1.0 if ok else 0.0), answer


def choose(scores: Sequence[float]) -> int:
    """Index of the highest score, the first on ties; -1 (no choice) if any score is NaN."""
    if not scores:
        raise ValueError("no options to choose from")
    if any(math.isnan(s) for s in scores):
        return -1
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def multiple_choice_scores(
    logprobs: Sequence[float], choices: Sequence[str], gold: int
) -> tuple[float, float]:
    """(acc, acc_norm) for one item.

    acc_norm divides each option's log-likelihood by the length in characters of the option text (the
    delimiter before it excluded), as lm-evaluation-harness does: characters, unlike tokens, compare
    equally across tokenizers, which matters when merged models are compared.
    """
    if len(logprobs) != len(choices):
        raise ValueError(f"{len(logprobs)} log-likelihoods for {len(choices)} options")
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} is out of range for {len(choices)} options")
    acc = 1.0 if choose(logprobs) == gold else 0.0
    normed = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    acc_norm = 1.0 if choose(normed) == gold else 0.0
    return acc, acc_norm


def mean_logprob(logprob: float, num_tokens: int) -> float:
    """Mean log-probability per token (nats); NaN (a broken model) becomes -inf so scores stay ordered."""
    if num_tokens <= 0:
        raise ValueError(f"cannot average over {num_tokens} tokens")
    value = logprob / num_tokens
    return -math.inf if math.isnan(value) else value


def perplexity(total_logprob: float, total_tokens: int) -> float:
    """Token-weighted corpus perplexity exp(-sum(logprob) / sum(tokens)); inf for a broken model."""
    if total_tokens <= 0:
        raise ValueError(f"cannot compute perplexity over {total_tokens} tokens")
    value = -total_logprob / total_tokens
    if math.isnan(value):
        return math.inf
    return math.exp(value) if value < 709.0 else math.inf
