"""Split selection (disjoint, deterministic, shuffled by seed), data formats, fingerprints, few-shot prompts."""

import pytest

from evomerge.errors import TaskError
from evomerge.fitness.prompts import build_context
from evomerge.fitness.task import load_task
from tests.fitness.conftest import generate_task, rows, write_jsonl


def _ids(task, split):
    return [item.id for item in task.items(split)]


def test_shuffle_is_deterministic_and_seeded(task_file):
    plain = load_task(task_file(generate_task()))
    a = load_task(task_file(generate_task(shuffle=True, seed=7)))
    b = load_task(task_file(generate_task(shuffle=True, seed=7)))
    c = load_task(task_file(generate_task(shuffle=True, seed=8)))
    assert _ids(a, "search") == _ids(b, "search") and a.fingerprint == b.fingerprint
    assert _ids(a, "search") != _ids(plain, "search")
    assert _ids(a, "search") != _ids(c, "search")
    for t in (plain, a, c):
        assert not set(_ids(t, "search")) & set(_ids(t, "heldout"))
        assert len(_ids(t, "search")) == 10 and len(_ids(t, "heldout")) == 10


def test_item_ids_default_to_split_and_row(task_file):
    task = load_task(task_file(generate_task(data={"file": "items.jsonl"}, shuffle=True)))
    for item in task.items("heldout"):
        assert item.id == f"train/{item.index}" and item.fields["id"] == f"q{item.index}"


def test_unknown_split_name(task_file):
    task = load_task(task_file(generate_task()))
    with pytest.raises(TaskError, match="unknown split 'test' .allowed: search, heldout"):
        task.items("test")


def test_named_splits_from_several_files_and_ids_checked_across_them(task_file, tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", rows(5))
    write_jsonl(tmp_path / "test.jsonl", [{**r, "id": f"t{i}"} for i, r in enumerate(rows(6))])
    files = {"train": "dev.jsonl", "test": "test.jsonl"}
    task = load_task(
        task_file(
            generate_task(
                data={"file": files, "id_field": "id"}, splits={"search": "train", "heldout": "test"}
            )
        )
    )
    assert _ids(task, "search") == [f"q{i}" for i in range(5)]
    assert _ids(task, "heldout") == [f"t{i}" for i in range(6)]
    # different data splits cannot be compared by row, but shared ids betray the same item
    write_jsonl(tmp_path / "test.jsonl", rows(6))
    with pytest.raises(TaskError, match="splits.heldout: item id 'q0' is also in splits.search"):
        load_task(
            task_file(
                generate_task(
                    data={"file": files, "id_field": "id"}, splits={"search": "train", "heldout": "test"}
                )
            )
        )


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet(task_file, tmp_path, fmt):
    from datasets import Dataset

    data = [{k: v for k, v in r.items() if k != "choices"} for r in rows(12)]
    getattr(Dataset.from_list(data), f"to_{fmt}")(str(tmp_path / f"items.{fmt}"))
    task = generate_task(
        data={"file": f"items.{fmt}", "id_field": "id"},
        splits={"search": {"split": "train", "size": 6}, "heldout": {"split": "train", "start": 6}},
    )
    loaded = load_task(task_file(task))
    assert _ids(loaded, "heldout") == [f"q{i}" for i in range(6, 12)]
    assert loaded.items("search")[2].fields["answer"] == 3


def test_fingerprint_follows_content_not_description(task_file, tmp_path):
    base = load_task(task_file(generate_task())).fingerprint
    assert load_task(task_file(generate_task(description="edited"))).fingerprint == base
    assert load_task(task_file(generate_task(version=2))).fingerprint != base
    assert load_task(task_file(generate_task(seed=3, shuffle=True))).fingerprint != base
    data = rows()
    data[0]["question"] = "What is 0 + 1, exactly?"
    assert load_task(task_file(generate_task(), data=data)).fingerprint != base


def test_fewshot_format_and_pool(task_file):
    task = load_task(
        task_file(
            generate_task(
                prompt={
                    "template": "Q: {question}\nA:",
                    "fewshot": {"k": 2, "split": "train", "separator": "\n---\n"},
                }
            )
        )
    )
    pool = {item.id for item in task.fewshot_pool}
    assert pool == {f"q{i}" for i in range(20, 30)}  # search and heldout items never serve as examples
    item = task.items("search")[0]
    context = build_context(task.config, item, task.fewshot_pool, "t.yaml", None)
    shots = context.split("\n---\n")
    assert len(shots) == 3 and shots[-1] == "Q: What is 0 + 1?\nA:"
    for shot in shots[:2]:
        n = int(shot.split("What is ")[1].split(" +")[0])
        assert shot == f"Q: What is {n} + 1?\nA: {n + 1}" and 20 <= n < 30
    # 'fixed' sampling: the same examples before every item, and the same across loads
    others = [build_context(task.config, i, task.fewshot_pool, "t.yaml", None) for i in task.items("heldout")]
    assert all(o.split("\n---\n")[:2] == shots[:2] for o in others)
    again = load_task(task_file(generate_task(prompt=task.config.prompt.model_dump())))
    assert (
        build_context(again.config, again.items("search")[0], again.fewshot_pool, "t.yaml", None) == context
    )


def test_fewshot_per_item_is_stable_and_varies(task_file):
    prompt = {"template": "{question}", "fewshot": {"k": 3, "split": "train", "sampling": "per_item"}}
    task = load_task(task_file(generate_task(prompt=prompt)))
    first = [build_context(task.config, i, task.fewshot_pool, "t", None) for i in task.items("search")]
    assert len({tuple(c.split("\n\n")[:3]) for c in first}) > 1
    again = load_task(task_file(generate_task(prompt=prompt)))
    assert [
        build_context(again.config, i, again.fewshot_pool, "t", None) for i in again.items("search")
    ] == first


def test_fewshot_from_a_slice_of_the_evaluated_split(task_file):
    prompt = {
        "template": "{question}",
        "fewshot": {"k": 2, "split": {"split": "train", "start": 15, "size": 10}},
    }
    task = load_task(task_file(generate_task(prompt=prompt)))
    assert {i.id for i in task.fewshot_pool} == {f"q{i}" for i in range(20, 25)}


def test_multiple_choice_fewshot_uses_gold_option(task_file):
    task = load_task(
        task_file(
            generate_task(
                prompt={
                    "template": "Colour of {id}?",
                    "target_delimiter": " -> ",
                    "fewshot": {"k": 1, "split": "train"},
                },
                scorer={"type": "multiple_choice", "choices": "choices", "gold": "label"},
            )
        )
    )
    shot = build_context(task.config, task.items("search")[0], task.fewshot_pool, "t", None).split("\n\n")[0]
    n = int(shot.split("Colour of q")[1].split("?")[0])
    assert shot == f"Colour of q{n}? -> {['red', 'green', 'blue'][n % 3]}"


def test_chat_template_wraps_the_whole_prompt(task_file):
    prompt = {"template": "Q: {question}", "chat_template": True, "fewshot": {"k": 1, "split": "train"}}
    task = load_task(task_file(generate_task(prompt=prompt)))
    item = task.items("search")[0]
    wrapped = build_context(
        task.config, item, task.fewshot_pool, "t", lambda s: f"<user>{s}</user><assistant>"
    )
    assert wrapped.startswith("<user>Q: What is 2") and wrapped.endswith(
        "Q: What is 0 + 1?</user><assistant>"
    )
    with pytest.raises(TaskError, match="t: prompt.chat_template: .*no apply_chat function"):
        build_context(task.config, item, task.fewshot_pool, "t", None)
    plain = load_task(task_file(generate_task()))
    assert build_context(plain.config, item, (), "t", lambda s: "ignored") == "Q: What is 0 + 1?\nA:"
