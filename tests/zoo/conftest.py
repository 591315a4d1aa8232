"""Zoo tests: the session's quick zoo (tests/conftest.py) scored once through the fitness layer."""

import pytest


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
