"""Task loading: a valid task, and every way a task file can be wrong (each error names file and key)."""

import copy

import pytest

from evomerge.errors import EvomergeError, TaskError
from evomerge.fitness.data import Item
from evomerge.fitness.prompts import render
from evomerge.fitness.task import GenerateScorer, MultipleChoiceScorer, load_task
from tests.fitness.conftest import generate_task, rows


def test_valid_task_loads(task_file):
    task = load_task(task_file(generate_task(version="2024-06", description="toy")))
    assert task.name == "toy" and task.version == "2024-06"
    assert isinstance(task.config.scorer, GenerateScorer)
    assert [i.id for i in task.items("search")] == [f"q{i}" for i in range(10)]
    assert [i.id for i in task.items("heldout")] == [f"q{i}" for i in range(10, 20)]
    assert task.items("search")[3].fields["answer"] == 4
    assert len(task.fingerprint) == 64


def test_task_error_is_a_value_error():
    assert issubclass(TaskError, EvomergeError) and issubclass(TaskError, ValueError)


def _set(task: dict, dotted: str, value) -> dict:
    task = copy.deepcopy(task)
    *parents, last = dotted.split(".")
    node = task
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return task


_DELETE = object()
_MC = {"type": "multiple_choice", "choices": "choices", "gold": "label"}
_LL = {"type": "loglikelihood", "reference": "text"}

# (case id, dotted key to set (or delete), value, key the message must name, a phrase it must hold)
SCHEMA_CASES = [
    ("missing name", "name", _DELETE, "name", "Field required"),
    ("missing target", "scorer.target", _DELETE, "scorer.target", "Field required"),
    ("version float", "version", 1.5, "version", "valid integer"),
    ("version empty", "version", "", "version", "at least 1 character"),
    ("unknown top key", "scorers", 1, "scorers", "unknown key (allowed: name, version"),
    (
        "unknown scorer key",
        "scorer.answer_field",
        "x",
        "scorer.answer_field",
        "unknown key (allowed: type, target",
    ),
    ("unknown slice key", "splits.search.count", 3, "splits.search.count", "allowed: split, start, size"),
    (
        "unknown scorer type",
        "scorer.type",
        "bleu",
        "scorer",
        "'generate', 'multiple_choice', 'loglikelihood'",
    ),
    (
        "scorer without type",
        "scorer.type",
        _DELETE,
        "scorer",
        "allowed: generate, multiple_choice, loglikelihood",
    ),
    ("bad extract", "scorer.extract", "last_word", "scorer.extract", "'regex'"),
    ("regex without pattern", "scorer.extract", "regex", "scorer", "'pattern' is required"),
    ("bad regex", "scorer.pattern", "(", "scorer", "not a valid regex"),
    ("empty split size", "splits.search.size", 0, "splits.search.size", "greater than or equal to 1"),
    (
        "numeric without punctuation",
        "scorer.normalize",
        ["remove_punctuation"],
        "scorer",
        "remove_punctuation",
    ),
    ("unknown normalization", "scorer.normalize", ["upper"], "scorer.normalize[0]", "'strip'"),
    ("file and dataset", "data.dataset", "gsm8k", "data", "exactly one of 'file'"),
    ("positional placeholder", "prompt.template", "Q: {}", "prompt.template", "positional"),
    ("malformed template", "prompt.template", "Q: {question", "prompt.template", "expected '}'"),
    ("fewshot k 0", "prompt.fewshot", {"k": 0, "split": "train"}, "prompt.fewshot.k", "greater than"),
    ("generate without prompt", "prompt", _DELETE, "prompt", "required for scorer type 'generate'"),
]


@pytest.mark.parametrize(
    ("case", "key", "value", "named", "phrase"), SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES]
)
def test_schema_errors_name_file_and_key(task_file, case, key, value, named, phrase):
    task = generate_task()
    if case == "bad regex":
        task = _set(task, "scorer.extract", "regex")
    path = task_file(_set(task, key, value))
    with pytest.raises(TaskError) as err:
        load_task(path)
    msg = str(err.value)
    assert f"{path}: {named}:" in msg and phrase in msg


DATA_CASES = [
    ("missing data file", "data.file", "nope.jsonl", "data.file", "does not exist"),
    ("unknown extension", "data.file", "task.yaml", "data.file", "set data.format"),
    ("unknown data split", "splits.search", {"split": "test"}, "splits.search.split", "no split 'test'"),
    (
        "slice past the end",
        "splits.heldout",
        {"split": "train", "start": 25, "size": 10},
        "splits.heldout",
        "which has 30",
    ),
    (
        "start past the end",
        "splits.heldout",
        {"split": "train", "start": 30},
        "splits.heldout",
        "selects no items",
    ),
    (
        "overlapping slices",
        "splits.heldout",
        {"split": "train", "start": 5, "size": 10},
        "splits.heldout",
        "overlaps splits.search on 5",
    ),
    (
        "whole split twice",
        "splits",
        {"search": "train", "heldout": "train"},
        "splits.heldout",
        "overlaps splits.search",
    ),
    (
        "template unknown field",
        "prompt.template",
        "Q: {query}",
        "prompt.template",
        "available fields: id, question",
    ),
    (
        "target unknown field",
        "scorer.target",
        "solution",
        "scorer.target",
        "'solution' is not in split 'train'",
    ),
    ("id field unknown", "data.id_field", "uid", "data.id_field", "'uid'"),
    (
        "fewshot pool too small",
        "prompt.fewshot",
        {"k": 11, "split": "train"},
        "prompt.fewshot",
        "only 10 items",
    ),
    (
        "fewshot unknown split",
        "prompt.fewshot",
        {"k": 1, "split": "dev"},
        "prompt.fewshot.split.split",
        "no split 'dev'",
    ),
    ("gold out of range", "scorer", {**_MC, "gold": "answer"}, "scorer.gold", "but there are 3 options"),
    ("gold text not an option", "scorer", {**_MC, "gold": "question"}, "scorer.gold", "not one of"),
    ("choices not a list", "scorer", {**_MC, "choices": "question"}, "scorer.choices", "expected a list"),
    ("fixed choices too few", "scorer", {**_MC, "choices": ["only"]}, "scorer.choices", "at least two"),
    ("ll with prompt and context", "scorer", {**_LL, "context": "question"}, "scorer.context", "not both"),
]


@pytest.mark.parametrize(
    ("case", "key", "value", "named", "phrase"), DATA_CASES, ids=[c[0] for c in DATA_CASES]
)
def test_data_errors_name_file_and_key(task_file, case, key, value, named, phrase):
    path = task_file(_set(generate_task(), key, value))
    with pytest.raises(TaskError) as err:
        load_task(path)
    msg = str(err.value)
    assert f"{path}: {named}:" in msg and phrase in msg


def test_malformed_yaml(task_file):
    path = task_file("name: toy\nprompt: [unclosed\n")
    with pytest.raises(TaskError, match=r"\(top level\): not valid YAML \(line 3"):
        load_task(path)
    assert str(path) in str(pytest.raises(TaskError, load_task, path).value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "", "just text\n"])
def test_top_level_must_be_a_mapping(task_file, text):
    path = task_file(text)
    with pytest.raises(TaskError, match=rf"{path}: \(top level\): a task must be a mapping"):
        load_task(path)


def test_missing_task_file(tmp_path):
    with pytest.raises(TaskError, match="cannot read the task file"):
        load_task(tmp_path / "absent.yaml")


def test_empty_data_split(task_file):
    path = task_file(generate_task(), data=[])
    with pytest.raises(TaskError, match=rf"{path}: data.file: could not read"):
        load_task(path)


def test_unreadable_data_file(task_file, tmp_path):
    path = task_file(generate_task())
    (tmp_path / "items.jsonl").write_text('{"id": "q0", "question": \n')
    with pytest.raises(TaskError, match=rf"{path}: data.file: could not read .*items.jsonl as json"):
        load_task(path)


def test_duplicate_ids(task_file):
    data = rows()
    data[12]["id"] = "q3"
    path = task_file(generate_task(), data=data)
    with pytest.raises(TaskError, match=rf"{path}: splits.heldout: item id 'q3' is also in splits.search"):
        load_task(path)


def test_loglikelihood_rejects_fewshot(task_file):
    task = generate_task(scorer=_LL, prompt={"template": "{question}", "fewshot": {"k": 1, "split": "train"}})
    path = task_file(task)
    with pytest.raises(
        TaskError, match=rf"{path}: prompt.fewshot: not supported for scorer type 'loglikelihood'"
    ):
        load_task(path)


def test_dataset_by_name_offline_is_a_clear_error(task_file):
    path = task_file(generate_task(data={"dataset": "evomerge-test/surely-not-cached", "config": "main"}))
    with pytest.raises(TaskError) as err:
        load_task(path)
    msg = str(err.value)
    assert f"{path}: data.dataset: could not load 'evomerge-test/surely-not-cached'" in msg
    assert "offline" in msg and "data.file" in msg


def test_render_error_names_item_and_its_fields():
    item = Item(id="q7", split="train", index=7, fields={"question": "?", "meta": {"lang": "en"}})
    assert render("{meta[lang]}: {question}", item, "t.yaml", "prompt.template") == "en: ?"
    with pytest.raises(
        TaskError, match=r"t.yaml: prompt.template: .*item 'q7'.*the item's fields: meta, question"
    ):
        render("{meta[topic]}", item, "t.yaml", "prompt.template")


def test_multiple_choice_with_fixed_options_and_text_gold(task_file):
    data = [
        {"id": f"s{i}", "review": f"review {i}", "sentiment": ["negative", "positive"][i % 2]}
        for i in range(8)
    ]
    task = generate_task(
        prompt={"template": "Review: {review}\nSentiment:"},
        scorer={"type": "multiple_choice", "choices": ["negative", "positive"], "gold": "sentiment"},
        splits={"search": {"split": "train", "size": 4}, "heldout": {"split": "train", "start": 4}},
    )
    loaded = load_task(task_file(task, data=data))
    assert isinstance(loaded.config.scorer, MultipleChoiceScorer)
    assert loaded.config.scorer.choices == ("negative", "positive")
    assert len(loaded.items("heldout")) == 4
