"""Evaluate one split of a task on a backend: build the requests, send each kind in one batch (the
backend splits it as it likes), score every item, and keep the per-item scores, never only a mean.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from evomerge.fitness import prompts, scorers
from evomerge.fitness.prompts import ApplyChat
from evomerge.fitness.requests import Backend, GenerateRequest, LoglikelihoodRequest
from evomerge.fitness.task import Item, Task


class TaskResult(BaseModel):
    """Scores of one task split for one model.

    ``scores[i]`` belongs to ``item_ids[i]`` (the split's drawing order) and is the primary per-item
    score named by ``metric``: 0/1 for 'exact_match', 'numeric_match' and 'acc'; mean log-probability
    per token (nats, <= 0) for 'logprob_per_token'. ``metrics`` always has 'mean' (of ``scores``), the
    metric's own name (the same value) and 'n'; multiple choice adds 'acc_norm'; loglikelihood adds
    'tokens', 'corpus_logprob_per_token' (weighted by tokens) and 'perplexity' (exp of minus that).
    ``item_metrics`` holds secondary per-item values ('acc_norm'; 'logprob' and 'tokens'), and
    ``responses`` the raw generations of a generate task, to check an extraction rule against.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    task: str
    version: int | str
    fingerprint: str
    split: str
    metric: str
    item_ids: list[str]
    scores: list[float]
    item_metrics: dict[str, list[float]] = {}
    responses: list[str] = []
    metrics: dict[str, float]

    @property
    def key(self) -> tuple[str, str, str, str]:
        """(task name, version, task fingerprint, split): what the scores depend on besides the model."""
        return (self.task, str(self.version), self.fingerprint, self.split)


def score_key(
    recipe_hash: str,
    task: Task,
    split: str,
    backend_name: str,
    decoding: Mapping[str, object] | str | None = None,
) -> str:
    """A stable cache key for one (merged model, task split, backend, decoding settings) evaluation.

    Form: 'recipe/task@version/fingerprint16/split/backend/decoding16', each part percent-encoded so no
    two different inputs share a key; ``decoding`` (e.g. dtype, engine settings) enters as a SHA-256 of
    its canonical JSON, so key order in a mapping does not matter.
    """
    task.items(split)  # unknown split names fail here, not as a silent cache miss
    canonical = json.dumps(decoding, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def q(part: object) -> str:
        return quote(str(part), safe=".-_")

    named = f"{q(task.name)}@{q(task.version)}"
    return "/".join([q(recipe_hash), named, *map(q, (task.fingerprint[:16], split, backend_name, digest))])


def evaluate(task: Task, split: str, backend: Backend, *, apply_chat: ApplyChat | None = None) -> TaskResult:
    """Score ``task``'s ``split`` ('search' or 'heldout') on ``backend``.

    ``apply_chat`` formats a prompt with the model's chat template (e.g. a tokenizer's
    ``apply_chat_template`` wrapped to take and return text); it is used only when the task sets
    ``prompt.chat_template: true``, and required then.
    """
    items = task.items(split)
    where = str(task.path)
    config = task.config
    contexts = [prompts.build_context(config, item, task.fewshot_pool, where, apply_chat) for item in items]
    score = {"generate": _generate, "multiple_choice": _multiple_choice, "loglikelihood": _loglikelihood}
    scores, extra, responses, metric = score[config.scorer.type](task, items, contexts, backend)

    mean = math.fsum(scores) / len(scores)
    metrics = {"mean": mean, metric: mean, "n": float(len(scores))}
    if "acc_norm" in extra:
        metrics["acc_norm"] = math.fsum(extra["acc_norm"]) / len(scores)
    if "tokens" in extra:
        total_lp, total_tokens = math.fsum(extra["logprob"]), int(sum(extra["tokens"]))
        metrics["corpus_logprob_per_token"] = total_lp / total_tokens
        metrics["perplexity"] = scorers.perplexity(total_lp, total_tokens)
        metrics["tokens"] = float(total_tokens)
    return TaskResult(
        task=task.name,
        version=task.version,
        fingerprint=task.fingerprint,
        split=split,
        metric=metric,
        item_ids=[item.id for item in items],
        scores=scores,
        item_metrics=extra,
        responses=responses,
        metrics=metrics,
    )


def _generate(task: Task, items: Sequence[Item], contexts: list[str], backend: Backend):
    s = task.config.scorer
    where = str(task.path)
    requests = [GenerateRequest(prompt=c, max_new_tokens=s.max_new_tokens, stop=s.stop) for c in contexts]
    outputs = _checked(backend.generate(requests), len(requests), backend, "generate")
    scores = []
    for item, output in zip(items, outputs, strict=True):
        score, _ = scorers.grade_generation(
            scorers.truncate_at_stop(output, s.stop),
            prompts.target_text(task.config, item, where),
            extract=s.extract,
            pattern=s.pattern,
            group=s.group,
            steps=s.normalize,
            match=s.match,
            tolerance=s.tolerance,
        )
        scores.append(score)
    metric = "exact_match" if s.match == "exact" else "numeric_match"
    return scores, {}, list(outputs), metric


def _multiple_choice(task: Task, items: Sequence[Item], contexts: list[str], backend: Backend):
    config, where = task.config, str(task.path)
    delimiter = config.prompt.target_delimiter
    options, golds, requests = [], [], []
    for item, context in zip(items, contexts, strict=True):
        choices = prompts.choice_texts(config, item, where)
        options.append(choices)
        golds.append(prompts.gold_index(config, item, choices, where))
        requests += [LoglikelihoodRequest(context=context, continuation=delimiter + c) for c in choices]
    answers = _checked(backend.loglikelihood(requests), len(requests), backend, "loglikelihood")
    acc, acc_norm, at = [], [], 0
    for choices, gold in zip(options, golds, strict=True):
        logprobs = [float(a.logprob) for a in answers[at : at + len(choices)]]
        at += len(choices)
        a, n = scorers.multiple_choice_scores(logprobs, choices, gold)
        acc.append(a)
        acc_norm.append(n)
    return acc, {"acc_norm": acc_norm}, [], "acc"


def _loglikelihood(task: Task, items: Sequence[Item], contexts: list[str], backend: Backend):
    config, where = task.config, str(task.path)
    requests = [
        LoglikelihoodRequest(context=c, continuation=prompts.reference_text(config, item, where))
        for item, c in zip(items, contexts, strict=True)
    ]
    answers = _checked(backend.loglikelihood(requests), len(requests), backend, "loglikelihood")
    scores, logprobs, tokens = [], [], []
    for item, answer in zip(items, answers, strict=True):
        if answer.num_tokens <= 0:
            raise RuntimeError(
                f"backend {backend.name!r} scored {answer.num_tokens} tokens for the reference of item {item.id!r}"
            )
        logprob = float(answer.logprob)
        logprob = -math.inf if math.isnan(logprob) else logprob  # a broken model: worst, but ordered
        scores.append(scorers.mean_logprob(logprob, answer.num_tokens))
        logprobs.append(logprob)
        tokens.append(float(answer.num_tokens))
    return scores, {"logprob": logprobs, "tokens": tokens}, [], "logprob_per_token"


def _checked(answers, expected: int, backend: Backend, kind: str) -> list:
    """The backend's answers as a list, after checking it answered every request exactly once."""
    answers = list(answers)
    if len(answers) != expected:
        raise RuntimeError(
            f"backend {getattr(backend, 'name', backend)!r} returned {len(answers)} answers to {expected} "
            f"{kind} requests"
        )
    return answers
