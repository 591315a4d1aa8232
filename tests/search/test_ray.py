"""Distributed evaluation on a real multi-node Ray cluster on this machine (a head plus two worker nodes):
results equal the in-process run; a killed worker or a removed node costs only what was in flight."""

import re
import signal
import threading
import time
from pathlib import Path

import pytest

from evomerge.search.run import start_run
from evomerge.search.store import read_run
from tests.search.test_run import config, results_per_hash, trace

pytestmark = [pytest.mark.ray, pytest.mark.slow]


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


def ray_config(cfg, address):
    return cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"ray": True, "address": address,
                                                                            "count": 2})})


def _nodes_used(run_dir):
    return {re.search(r"node=(\w+)", r.worker).group(1) for r in read_run(run_dir).results.values()}


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


def test_a_killed_worker_costs_only_its_candidate(cluster, local_reference, tmp_path):
    import os

    c, _ = cluster
    cfg, ref = local_reference
    run_dir = tmp_path / "run"
    killed = []

    def kill_one():
        # the worker that finished the latest result: by now it is evaluating another candidate
        pid = int(re.search(r":(\d+) ", list(read_run(run_dir).results.values())[-1].worker).group(1))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = _after_results(run_dir, 2, kill_one)
    summary = start_run(ray_config(cfg, c.address), run_dir, progress=False)
    watcher.join()
    assert killed, "the worker was not killed during the run"
    assert summary.evaluated == 8 and summary.failed == 0
    assert trace(run_dir) == trace(ref)
    assert all(n == 1 for n in results_per_hash(run_dir).values())


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
    assert summary.evaluated == 8 and summary.failed == 0
    assert trace(run_dir) == trace(ref)
    assert all(n == 1 for n in results_per_hash(run_dir).values())


def test_lineage_candidates_on_an_actor_equal_the_in_process_run(cluster, quick_zoo, tmp_path):
    """Model-space M2N2: children name earlier candidates, whose recipes an actor is sent once. One actor,
    so that the steady-state optimizer sees results in the in-process run's order."""
    c, _ = cluster
    cfg = config(quick_zoo, tmp_path, budget=14, space={"kind": "models"},
                 optimizer={"name": "m2n2", "settings": {"archive_size": 4}})
    start_run(cfg, tmp_path / "local", progress=False)
    one = ray_config(cfg, c.address)
    one = one.model_copy(update={"workers": one.workers.model_copy(update={"count": 1})})
    summary = start_run(one, tmp_path / "ray", progress=False)
    assert summary.evaluated == 14 and summary.failed == 0
    assert trace(tmp_path / "ray") == trace(tmp_path / "local")
    view = read_run(tmp_path / "ray")
    named = [s["model"] for cand in view.candidates.values() for s in cand.recipe.get("sources", [])]
    assert any(m.startswith("candidate:") for m in named), "no child named an earlier candidate"
