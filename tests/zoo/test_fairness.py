"""What makes the quick zoo a fair merge benchmark, measured with evaluate() + HFBackend on the heldout
splits: each expert clearly beats the base on its own skill, is no better than the base on the others,
and the base knows every skill's answer format."""

import re

import pytest

from evomerge.zoo.skills import SKILLS

GAIN = 0.3  # an expert's heldout accuracy on its own skill is at least the base's plus this
SLACK = 0.1  # ... and on another skill at most the base's plus this

SHAPES = {"add": r"\d+", "reverse": r"[a-z]+", "lexicon": r"[a-z]+( [a-z]+)+"}


def _scores(heldout):
    return {model: {skill: r.metrics["mean"] for skill, r in row.items()} for model, row in heldout.items()}


@pytest.mark.parametrize("skill", list(SKILLS))
def test_expert_beats_the_base_on_its_own_skill(heldout, skill):
    scores = _scores(heldout)
    assert scores[skill][skill] >= scores["base"][skill] + GAIN, scores


@pytest.mark.parametrize("expert", list(SKILLS))
def test_expert_is_weak_on_the_other_skills(heldout, expert):
    scores = _scores(heldout)
    for skill in SKILLS:
        if skill != expert:
            assert scores[expert][skill] <= scores["base"][skill] + SLACK, scores
            assert scores[skill][skill] >= scores[expert][skill] + GAIN, scores


@pytest.mark.parametrize("skill", list(SKILLS))
def test_the_base_knows_the_answer_formats(heldout, skill):
    replies = heldout["base"][skill].responses
    shaped = sum(bool(re.fullmatch(SHAPES[skill], r.strip())) for r in replies)
    assert shaped >= 0.9 * len(replies), replies


def test_scores_are_keyed_by_the_shipped_tasks(heldout):
    result = heldout["base"]["add"]
    assert result.task == "zoo_add" and result.split == "heldout" and len(result.scores) == 50
