"""evaluate() against a deterministic fake backend: requests built, one batch per kind, per-item scores."""

import math
import re

import pytest

from evomerge.errors import TaskError
from evomerge.fitness.evaluate import TaskResult, evaluate, score_key
from evomerge.fitness.requests import Backend, GenerateRequest, LoglikelihoodRequest
from evomerge.fitness.task import load_task
from tests.fitness.conftest import generate_task
from tests.fitness.fakes import FakeBackend


def _n(prompt: str) -> int:
    return int(re.findall(r"What is (\d+) \+ 1\?", prompt)[-1])


def _half_right(prompt: str) -> str:
    """Right for even n, off by one for odd n; always runs past the stop string."""
    n = _n(prompt)
    return f" The answer is {n + 1 if n % 2 == 0 else n}.\nQ: next question"


def test_fake_backend_meets_the_protocol():
    assert isinstance(FakeBackend(), Backend)


def test_generate_scores_each_item_in_order(task_file):
    task = load_task(
        task_file(generate_task(scorer={**generate_task()["scorer"], "stop": ["\n"], "max_new_tokens": 8}))
    )
    backend = FakeBackend(answer=_half_right)
    result = evaluate(task, "heldout", backend)
    assert backend.calls == [("generate", 10)]
    assert backend.requests[0] == GenerateRequest(
        prompt="Q: What is 10 + 1?\nA:", max_new_tokens=8, stop=("\n",)
    )
    assert result.item_ids == [f"q{i}" for i in range(10, 20)]
    assert result.scores == [1.0 if i % 2 == 0 else 0.0 for i in range(10, 20)]
    assert result.metric == "numeric_match"
    assert result.metrics == {"mean": 0.5, "numeric_match": 0.5, "n": 10.0}
    assert result.responses[0] == " The answer is 11."
    assert result.key == ("toy", "1", task.fingerprint, "heldout")


def test_generate_truncates_at_stop_even_if_backend_does_not(task_file):
    class Sloppy(FakeBackend):
        def generate(self, requests):
            return [f"{_n(r.prompt) + 1}\n999" for r in requests]

    task = load_task(task_file(generate_task(scorer={**generate_task()["scorer"], "stop": ["\n"]})))
    assert evaluate(task, "search", Sloppy()).metrics["mean"] == 1.0


def test_exact_match_with_regex_and_normalization(task_file):
    scorer = {
        "type": "generate",
        "target": "answer",
        "extract": "regex",
        "pattern": r"(?i)answer: *(\S+)",
        "normalize": ["strip", "lowercase", "remove_punctuation"],
        "match": "exact",
    }
    task = load_task(task_file(generate_task(scorer=scorer)))
    answers = {f"Q: What is {i} + 1?\nA:": f"ANSWER: {i + 1}." for i in range(5)}  # the rest: no answer
    result = evaluate(task, "search", FakeBackend(answers=answers))
    assert result.metric == "exact_match"
    assert result.scores == [1.0] * 5 + [0.0] * 5


def test_multiple_choice_acc_and_acc_norm(task_file):
    task = load_task(
        task_file(
            generate_task(
                prompt={"template": "Colour {id}:"},
                scorer={"type": "multiple_choice", "choices": "choices", "gold": "label"},
            )
        )
    )
    # options: ' red' ' green' ' blue'; gold = i % 3. Raw log-likelihood favours 'red'; per character
    # 'green' (5 chars) wins: -6/5 > -4/3 > -5/4... so acc is right on label 0, acc_norm on label 1.
    table = {" red": -4.0, " green": -6.0, " blue": -5.5}
    backend = FakeBackend(score=lambda ctx, cont: table[cont])
    result = evaluate(task, "search", backend)
    assert backend.calls == [("loglikelihood", 30)]
    assert backend.requests[:3] == [
        LoglikelihoodRequest("Colour q0:", c) for c in (" red", " green", " blue")
    ]
    labels = [i % 3 for i in range(10)]
    assert result.scores == [1.0 if g == 0 else 0.0 for g in labels]
    assert result.item_metrics["acc_norm"] == [1.0 if g == 1 else 0.0 for g in labels]
    assert result.metric == "acc"
    assert result.metrics["acc"] == pytest.approx(0.4) and result.metrics["acc_norm"] == pytest.approx(0.3)


def test_loglikelihood_mean_per_token_and_perplexity(task_file):
    task = load_task(
        task_file(generate_task(prompt=None, scorer={"type": "loglikelihood", "reference": "text"}))
    )
    # 'Item number {i} is here.' is 5 words = 5 fake tokens; give item i a log-likelihood of -(i + 1).
    backend = FakeBackend(score=lambda ctx, cont: -float(int(cont.split()[2]) + 1))
    result = evaluate(task, "search", backend)
    assert backend.requests[0] == LoglikelihoodRequest("", "Item number 0 is here.")
    assert result.scores == [-(i + 1) / 5 for i in range(10)]
    assert result.metric == "logprob_per_token"
    assert result.metrics["tokens"] == 50.0
    assert result.metrics["perplexity"] == pytest.approx(math.exp(55 / 50))
    assert result.metrics["mean"] == pytest.approx(-55 / 50)


def test_loglikelihood_context_field_and_template(task_file):
    with_field = load_task(
        task_file(
            generate_task(
                prompt=None, scorer={"type": "loglikelihood", "reference": "text", "context": "question"}
            )
        )
    )
    with_template = load_task(
        task_file(
            generate_task(
                prompt={"template": "{question} "}, scorer={"type": "loglikelihood", "reference": "text"}
            )
        )
    )
    b1, b2 = FakeBackend(), FakeBackend()
    evaluate(with_field, "search", b1)
    evaluate(with_template, "search", b2)
    assert b1.requests[0] == LoglikelihoodRequest("What is 0 + 1?", "Item number 0 is here.")
    assert b2.requests[0] == LoglikelihoodRequest("What is 0 + 1? ", "Item number 0 is here.")


def test_chat_template_reaches_the_requests(task_file):
    task = load_task(task_file(generate_task(prompt={"template": "{question}", "chat_template": True})))
    backend = FakeBackend()
    evaluate(task, "search", backend, apply_chat=lambda s: f"<|user|>{s}<|assistant|>")
    assert backend.requests[0].prompt == "<|user|>What is 0 + 1?<|assistant|>"
    with pytest.raises(TaskError, match="chat_template"):
        evaluate(task, "search", FakeBackend())


def test_backend_answering_the_wrong_count_is_an_error(task_file):
    class Short(FakeBackend):
        def generate(self, requests):
            return super().generate(requests)[:-1]

    task = load_task(task_file(generate_task()))
    with pytest.raises(RuntimeError, match="backend 'fake' returned 9 answers to 10 generate requests"):
        evaluate(task, "search", Short())


def test_result_round_trips_through_json(task_file):
    task = load_task(
        task_file(generate_task(prompt=None, scorer={"type": "loglikelihood", "reference": "text"}))
    )
    result = evaluate(task, "heldout", FakeBackend(score=lambda ctx, cont: float("nan")))
    assert result.metrics["perplexity"] == math.inf and result.scores[0] == -math.inf
    assert TaskResult.model_validate_json(result.model_dump_json()) == result


def test_score_key_is_stable_and_separates_every_part(task_file):
    task = load_task(task_file(generate_task()))
    key = score_key("abc123", task, "search", "hf", {"dtype": "bfloat16", "batch": 8})
    assert key == score_key("abc123", task, "search", "hf", {"batch": 8, "dtype": "bfloat16"})
    assert key.startswith(f"abc123/toy@1/{task.fingerprint[:16]}/search/hf/")
    others = {
        score_key("abc124", task, "search", "hf", {"dtype": "bfloat16", "batch": 8}),
        score_key("abc123", task, "heldout", "hf", {"dtype": "bfloat16", "batch": 8}),
        score_key("abc123", task, "search", "vllm", {"dtype": "bfloat16", "batch": 8}),
        score_key("abc123", task, "search", "hf", {"dtype": "float16", "batch": 8}),
        score_key(
            "abc123",
            load_task(task_file(generate_task(version=2))),
            "search",
            "hf",
            {"dtype": "bfloat16", "batch": 8},
        ),
    }
    assert key not in others and len(others) == 5
    assert score_key("a/b", task, "search", "hf") != score_key("a", task, "search", "b/hf")
    at_in_name = load_task(task_file(generate_task(name="x@1", version=2)))
    at_in_version = load_task(task_file(generate_task(name="x", version="1@2")))
    assert score_key("r", at_in_name, "search", "hf").split("/")[1] == "x%401@2"
    assert score_key("r", at_in_version, "search", "hf").split("/")[1] == "x@1%402"
    with pytest.raises(TaskError, match="unknown split"):
        score_key("abc123", task, "train", "hf")
