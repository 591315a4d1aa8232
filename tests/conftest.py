"""Shared fixtures: tiny checkpoints built in-process (never a hub download)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Compiled merge kernels switch on by themselves after 10 s of eager work in a process (minutes of compile
# time on a cold cache); tests that exercise them set EVOMERGE_COMPILE themselves.
os.environ.setdefault("EVOMERGE_COMPILE", "0")
if "HF_DATASETS_CACHE" not in os.environ:  # load_task reads jsonl through datasets, which caches
    _cache = tempfile.mkdtemp(prefix="evomerge-datasets-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["HF_DATASETS_CACHE"] = _cache


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base (4 layers, hidden 32), three experts, a GPT-2 and odd variants."""
    from evomerge.zoo.tiny import expert_of, tiny_gpt2, tiny_llama

    root = tmp_path_factory.mktemp("zoo")
    base = tiny_llama(root / "base", seed=0)
    models = {"base": base}
    for i in (1, 2, 3):
        models[f"e{i}"] = expert_of(base, root / f"e{i}", seed=i)
    models["gpt2"] = tiny_gpt2(root / "gpt2")
    models["bigvocab"] = tiny_llama(root / "bigvocab", seed=5, extra_words=6)
    models["deep"] = tiny_llama(root / "deep", seed=6, layers=6)
    return models


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """The quick preset built once for the session (seed 0)."""
    from evomerge.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "quick", quick=True)
