"""Distributed evaluation on a real multi-node Ray cluster on this machine (a head plus two worker nodes):
results equal the in-process run; a killed worker or a removed node costs only what was in flight."""

import re
import signal
import threading
import time
from collections import deque
from pathlib import Path

import pytest

from evomerge.search.run import start_run
from evomerge.search.store import read_run
from tests.search.test_run import config, results_per_hash, trace


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local_reference(quick_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    cfg = config(quick_zoo, tmp, budget=8)
    start_run(cfg, tmp / "run", progress=False)
    return cfg, tmp / "run"


def ray_config(cfg, address, **workers):
    update = {"ray": True, "address": address, "count": 2, **workers}
    return cfg.model_copy(update={"workers": cfg.workers.model_copy(update=update)})


def _nodes_used(run_dir):
    return {re.search(r"node=(\w+)", r.worker).group(1) for r in read_run(run_dir).results.values()}


@pytest.mark.ray
@pytest.mark.slow
def test_search_across_nodes_equals_the_in_process_run(cluster, local_reference, tmp_path):
    c, _ = cluster
    cfg, ref = local_reference
    summary = start_run(ray_config(cfg, c.address), tmp_path / "run", progress=False)
    assert summary.evaluated == 8
    assert trace(tmp_path / "run") == trace(ref)
    assert len(_nodes_used(tmp_path / "run")) == 2  # both worker nodes evaluated candidates


def _after_results(run_dir: Path, n: int, action):
    def watch():
        journal = run_dir / "journal.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count('"kind":"result"') >= n:
                time.sleep(0.2)  # inside the next evaluations
                action()
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _run_killing_a_worker(cfg, run_dir: Path, after: int):
    """Run ``cfg`` and SIGKILL, once ``after`` results are in, the worker that returned the latest one (by
    then it is evaluating another candidate)."""
    import os

    killed = []

    def kill_one():
        pid = int(re.search(r":(\d+) ", list(read_run(run_dir).results.values())[-1].worker).group(1))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = _after_results(run_dir, after, kill_one)
    summary = start_run(cfg, run_dir, progress=False)
    watcher.join()
    assert killed, "the worker was not killed during the run"
    return summary


def _assert_as_in_process(summary, run_dir, ref) -> None:
    """All 8 candidates evaluated, none failed, each exactly once, in the in-process run's trace."""
    assert summary.evaluated == 8 and summary.failed == 0
    assert trace(run_dir) == trace(ref)
    assert all(n == 1 for n in results_per_hash(run_dir).values())


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_costs_only_its_candidate(cluster, local_reference, tmp_path):
    c, _ = cluster
    cfg, ref = local_reference
    run_dir = tmp_path / "run"
    summary = _run_killing_a_worker(ray_config(cfg, c.address), run_dir, 2)
    _assert_as_in_process(summary, run_dir, ref)


@pytest.mark.ray
@pytest.mark.slow
def test_removing_a_node_mid_run(cluster, local_reference, tmp_path):
    c, nodes = cluster
    cfg, ref = local_reference
    run_dir = tmp_path / "run"
    removed = []

    def remove():
        c.remove_node(nodes[0])
        removed.append(nodes[0])

    watcher = _after_results(run_dir, 2, remove)
    summary = start_run(ray_config(cfg, c.address), run_dir, progress=False)
    watcher.join()
    assert removed
    nodes.remove(removed[0])
    nodes.append(c.add_node(num_cpus=1))  # leave the cluster as it was for other tests
    _assert_as_in_process(summary, run_dir, ref)


@pytest.mark.ray
@pytest.mark.slow
def test_lineage_candidates_on_an_actor_equal_the_in_process_run(cluster, quick_zoo, tmp_path):
    """Model-space M2N2: children name earlier candidates, whose recipes an actor is sent once. One actor,
    so that the steady-state optimizer sees results in the in-process run's order."""
    c, _ = cluster
    cfg = config(quick_zoo, tmp_path, budget=14, space={"kind": "models"},
                 optimizer={"name": "m2n2", "settings": {"archive_size": 4}})
    start_run(cfg, tmp_path / "local", progress=False)
    one = ray_config(cfg, c.address, count=1, queue=0)  # nothing sent ahead: one candidate in flight
    summary = start_run(one, tmp_path / "ray", progress=False)
    assert summary.evaluated == 14 and summary.failed == 0
    assert trace(tmp_path / "ray") == trace(tmp_path / "local")
    view = read_run(tmp_path / "ray")
    named = [s["model"] for cand in view.candidates.values() for s in cand.recipe.get("sources", [])]
    assert any(m.startswith("candidate:") for m in named), "no child named an earlier candidate"


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_with_candidates_queued_loses_none(cluster, quick_zoo, tmp_path):
    """Random search sends one candidate ahead to each busy actor (the default for optimizers that never
    wait on a generation): killing an actor mid-run loses the one it evaluates and the one queued behind it,
    and both are evaluated once elsewhere. Random asks do not depend on results, so the run equals the
    in-process one."""
    c, _ = cluster
    cfg = config(quick_zoo, tmp_path, budget=10, optimizer={"name": "random"})
    start_run(cfg, tmp_path / "local", progress=False)
    run_dir = tmp_path / "ray"
    summary = _run_killing_a_worker(ray_config(cfg, c.address), run_dir, 3)
    assert summary.evaluated == 10 and summary.failed == 0
    assert trace(run_dir) == trace(tmp_path / "local")
    assert all(n == 1 for n in results_per_hash(run_dir).values())
    idle = [r.timings["idle"] for r in read_run(run_dir).results.values() if "idle" in r.timings]
    assert idle and all(t >= 0 for t in idle)  # each actor's wait between its candidates is recorded


class _Handle:
    """Stands in for an actor handle: records what was sent to it."""

    def __init__(self, name, sent):
        self.evaluate = self
        self.name, self.sent = name, sent

    def remote(self, recipe, lineage):
        self.sent.append((self.name, recipe))
        return object()


def test_idle_actors_get_work_before_any_is_queued():
    from evomerge.recipe.schema import Recipe
    from evomerge.search.ray_pool import PoolSettings, RayExecutor, _Slot

    recipes = [Recipe(method="linear", sources=[{"model": f"m{i}"}]) for i in range(6)]
    sent = []
    pool = RayExecutor.__new__(RayExecutor)  # the dispatch bookkeeping alone, without Ray
    pool.settings = PoolSettings(queue=1)
    pool.slots = [_Slot(_Handle(n, sent), {}) for n in ("a", "b", "c")]
    pool.store, pool._pending, pool._sent = {}, {}, {}
    pool._queue = deque()
    assert pool.capacity == 6
    pool.slots[0].in_flight = 1  # actor a is busy
    for key in range(4):
        pool.submit(key, recipes[key])
    # b and c were idle: they get the first two; then a and b get one queued each; c waits its turn
    r = recipes
    assert sent == [("b", r[0]), ("c", r[1]), ("a", r[2]), ("b", r[3])]
    assert [s.in_flight for s in pool.slots] == [2, 2, 1]
    pool.submit(4, r[4])
    pool.submit(5, r[5])
    assert sent[4:] == [("c", r[4])] and list(pool._queue) == [(5, r[5])]  # every actor is full


@pytest.mark.parametrize(("optimizer", "queue", "expected"),
                         [("m2n2", None, 1), ("random", None, 1), ("cmaes", None, 0), ("nsga2", None, 0),
                          ("cmaes", 2, 2), ("m2n2", 0, 0)])
def test_candidates_are_sent_ahead_only_for_optimizers_that_never_wait_on_a_generation(optimizer, queue, expected):
    from evomerge.search.config import Workers
    from evomerge.search.optimizers import optimizer_class
    from evomerge.search.ray_pool import PoolSettings

    settings = PoolSettings.for_run(Workers(count=3, queue=queue), optimizer_class(optimizer))
    assert settings.queue == expected and settings.num_workers == 3
