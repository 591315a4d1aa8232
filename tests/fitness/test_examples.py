"""The shipped fitness/*.yaml tasks load, have non-empty disjoint splits, and score as expected on
oracle fakes; their data files are what evomerge/fitness/examples.py writes."""

import json
import re
from pathlib import Path

import pytest

from evomerge.fitness.evaluate import evaluate
from evomerge.fitness.task import load_task
from tests.fitness.fakes import FakeBackend

FITNESS = Path(__file__).parents[2] / "fitness"
EXAMPLES = sorted(FITNESS.glob("*.yaml"))


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"arithmetic", "capitals_mc", "text_ppl"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_task_loads_with_disjoint_splits(path):
    task = load_task(path)
    search, heldout = task.items("search"), task.items("heldout")
    assert search and heldout
    assert not {i.id for i in search} & {i.id for i in heldout}
    assert not {(i.split, i.index) for i in search} & {(i.split, i.index) for i in heldout}
    assert not {i.id for i in task.fewshot_pool} & {i.id for i in (*search, *heldout)}
    assert load_task(path).fingerprint == task.fingerprint


def _solve(prompt: str) -> str:
    a, op, b = re.findall(r"What is (\d+) ([+-]) (\d+)\?", prompt)[-1]
    return f" {int(a) + int(b) if op == '+' else int(a) - int(b)}\n"


def test_arithmetic_oracle_scores_one():
    task = load_task(FITNESS / "arithmetic.yaml")
    for split in ("search", "heldout"):
        assert evaluate(task, split, FakeBackend(answer=_solve)).metrics["mean"] == 1.0


def test_capitals_oracle_scores_one():
    task = load_task(FITNESS / "capitals_mc.yaml")
    gold = {}
    for item in (*task.items("search"), *task.items("heldout")):
        gold[item.fields["country"]] = item.fields["choices"][item.fields["label"]]

    def score(context: str, continuation: str) -> float:
        country = re.findall(r"capital of (.+)\?", context)[-1]
        return 0.0 if continuation.strip() == gold[country] else -10.0

    result = evaluate(task, "heldout", FakeBackend(score=score))
    assert result.metrics["acc"] == 1.0 and result.metrics["acc_norm"] == 1.0


def test_text_ppl_runs():
    task = load_task(FITNESS / "text_ppl.yaml")
    result = evaluate(task, "search", FakeBackend(score=lambda ctx, cont: -2.0 * len(cont.split())))
    assert result.scores == [-2.0] * len(task.items("search"))
    assert result.metrics["perplexity"] == pytest.approx(2.718281828**2, rel=1e-6)


def test_example_data_is_what_the_generator_writes():
    from evomerge.fitness.examples import examples

    for name, rows in examples().items():
        committed = [json.loads(line) for line in (FITNESS / "data" / name).read_text().splitlines()]
        assert committed == rows, name
