"""Zoo tests: one quick zoo per session (about 30 s of training), scored once through the fitness layer."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:  # load_task reads jsonl through datasets, which caches
    _cache = tempfile.mkdtemp(prefix="evomerge-zoo-datasets-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["HF_DATASETS_CACHE"] = _cache


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """The quick preset built once for the session (seed 0)."""
    from evomerge.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "quick", quick=True)


@pytest.fixture(scope="session")
def heldout(quick_zoo):
    """{model: {skill: TaskResult}} on every skill's heldout split (evaluate() + HFBackend)."""
    from evomerge.fitness.backends.hf import HFBackend
    from evomerge.fitness.evaluate import evaluate
    from evomerge.fitness.task import load_task

    tasks = {name: load_task(path) for name, path in quick_zoo.tasks.items()}
    results = {}
    for model, path in quick_zoo.models.items():
        backend = HFBackend(path, batch_size=50)
        results[model] = {name: evaluate(task, "heldout", backend) for name, task in tasks.items()}
    return results
