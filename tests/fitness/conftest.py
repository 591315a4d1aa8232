"""Fitness tests: offline, a throwaway datasets cache, and task files written into tmp dirs."""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="evomerge-fitness-datasets-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["HF_DATASETS_CACHE"] = _cache


def rows(n: int = 30) -> list[dict]:
    """Items with fields for every scorer type: question/answer, choices/label, text."""
    return [
        {
            "id": f"q{i}",
            "question": f"What is {i} + 1?",
            "answer": i + 1,
            "choices": ["red", "green", "blue"],
            "label": i % 3,
            "text": f"Item number {i} is here.",
        }
        for i in range(n)
    ]


def generate_task(**overrides) -> dict:
    """A valid generate task over rows(): search 0..9, heldout 10..19, the rest for few-shot."""
    task = {
        "name": "toy",
        "version": 1,
        "data": {"file": "items.jsonl", "id_field": "id"},
        "splits": {
            "search": {"split": "train", "start": 0, "size": 10},
            "heldout": {"split": "train", "start": 10, "size": 10},
        },
        "prompt": {"template": "Q: {question}\nA:"},
        "scorer": {"type": "generate", "target": "answer", "extract": "last_number", "match": "numeric"},
    }
    task.update(overrides)
    return task


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture
def task_file(tmp_path):
    """Write a task (a dict, or raw YAML text) and its data (rows() unless given) into tmp_path."""

    def write(task: dict | str, data: list[dict] | None = None, name: str = "task.yaml") -> Path:
        write_jsonl(tmp_path / "items.jsonl", rows() if data is None else data)
        path = tmp_path / name
        path.write_text(task if isinstance(task, str) else yaml.safe_dump(task, sort_keys=False))
        return path

    return write
