"""Runs that survive the night: reproducible, resumable after SIGKILL, failure-tolerant, never evaluating
one recipe twice. Real parts throughout: the quick tiny zoo, HF backend, pycma, the journal on disk."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.search.config import parse_search_config
from evomerge.search.journal import Journal, JournalError
from evomerge.search.run import LocalExecutor, resume_run, start_run
from evomerge.search.store import read_run

pytestmark = pytest.mark.slow


def config(quick_zoo, tmp_path, *, optimizer=None, budget=12, sources=("add", "reverse"), **over):
    data = {
        "name": "t",
        "seed": 3,
        "models": {"base": str(quick_zoo.base), "sources": [str(quick_zoo.experts[s]) for s in sources]},
        "space": {"kind": "parameters", "method": "task_arithmetic", "layer_groups": 2},
        "tasks": [{"path": str(quick_zoo.tasks[s])} for s in sources],
        "optimizer": optimizer or {"name": "cmaes", "settings": {"popsize": 4}},
        "budget": {"evaluations": budget},
        "evaluation": {"batch_size": 64},
        "workers": {"ray": False},
    }
    data.update(over)
    return parse_search_config(data, tmp_path)


def trace(run_dir):
    """What must match between two runs: the asks in order and every result's scores."""
    view = read_run(run_dir)
    asks = [(c.id, c.recipe_hash) for c in sorted(view.candidates.values(), key=lambda c: c.id)]
    results = {
        h: {t: {s: r["scores"] for s, r in splits.items()} for t, splits in rec.results.items()}
        for h, rec in view.results.items()
    }
    return asks, results


def results_per_hash(run_dir):
    counts = {}
    for rec in Journal(Path(run_dir) / "journal.jsonl").read():
        if rec["kind"] in ("result", "failed"):
            counts[rec["hash"]] = counts.get(rec["hash"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def reference_run(quick_zoo, tmp_path_factory):
    """One uninterrupted CMA-ES run: the baseline every other run is compared with."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = config(quick_zoo, tmp)
    summary = start_run(cfg, tmp / "run", progress=False)
    return cfg, tmp / "run", summary


def test_run_completes_and_same_seed_same_candidates(quick_zoo, tmp_path, reference_run):
    cfg, ref_dir, summary = reference_run
    assert summary.evaluated == 12 and summary.reason == "budget"
    view = read_run(ref_dir)
    assert len(view.results) == 12 and not view.in_flight()
    assert all(set(r.results) == {"zoo_add", "zoo_reverse"} for r in view.results.values())
    assert all(set(s) == {"search", "heldout"} for r in view.results.values() for s in r.results.values())
    assert all(r.timings["in_place"] == 1.0 for r in view.results.values())  # merged into the resident model
    assert not view.failures
    again = start_run(cfg, tmp_path / "again", progress=False)
    assert again.evaluated == 12
    assert trace(tmp_path / "again") == trace(ref_dir)
    other = start_run(cfg.model_copy(update={"seed": 4}), tmp_path / "other", progress=False)
    assert trace(tmp_path / "other")[0] != trace(ref_dir)[0]
    assert other.evaluated == 12


def _kill_after(cmd, run_dir, results, extra_delay):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = Path(run_dir) / "journal.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
        if journal.exists() and journal.read_text().count('"kind":"result"') >= results:
            break
        time.sleep(0.02)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize(("results", "delay"), [(2, 0.0), (5, 0.15)])
def test_sigkill_then_resume_matches_the_uninterrupted_run(
    quick_zoo, tmp_path, reference_run, results, delay
):
    cfg, ref_dir, _ = reference_run
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "evomerge", "run", str(cfg_path), "--run-dir", str(run_dir), "-q"]
    _kill_after(cmd, run_dir, results, delay)
    before = read_run(run_dir)
    assert 0 < before.evaluated < 12 and before.ended is None
    finished_before = set(before.results)
    summary = resume_run(run_dir, progress=False)
    assert summary.evaluated == 12
    assert trace(run_dir) == trace(ref_dir)
    counts = results_per_hash(run_dir)
    assert all(n == 1 for n in counts.values()), "a finished evaluation was run again"
    assert finished_before <= set(counts)
    after = read_run(run_dir)
    assert after.resumes == 1 and after.ended["reason"] == "budget"


def test_torn_last_line_and_budget_extension(quick_zoo, tmp_path, reference_run):
    cfg, ref_dir, _ = reference_run
    small = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"evaluations": 6})})
    start_run(small, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "journal.jsonl", "ab") as f:
        f.write(b'{"kind":"result","id":6,"hash":"ab')  # killed in the middle of a write
    summary = resume_run(tmp_path / "run", evaluations=12, progress=False)
    assert summary.evaluated == 12
    assert trace(tmp_path / "run") == trace(ref_dir)


def test_foreign_or_edited_config_is_refused(quick_zoo, tmp_path, reference_run):
    cfg, ref_dir, _ = reference_run
    with pytest.raises(EvomergeError, match="resume"):
        start_run(cfg, ref_dir, progress=False)
    other = cfg.model_copy(update={"seed": 99})
    with pytest.raises(EvomergeError, match="different config"):
        start_run(other, ref_dir, progress=False)
    run_dir = tmp_path / "run"
    start_run(
        cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"evaluations": 2})}),
        run_dir,
        progress=False,
    )
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    stored["seed"] = 7
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(JournalError, match="different config"):
        resume_run(run_dir, progress=False)
    with pytest.raises(JournalError, match="not a run directory"):
        resume_run(tmp_path, progress=False)


class Flaky:
    """Wraps the real evaluator; the first attempt of every second recipe raises."""

    def __init__(self, inner):
        self.inner = inner
        self.seen = {}

    def evaluate(self, recipe):
        h = recipe.content_hash()
        self.seen[h] = self.seen.get(h, 0) + 1
        if len(self.seen) % 2 == 0 and self.seen[h] == 1:
            raise RuntimeError("worker lost")
        return self.inner.evaluate(recipe)

    def close(self):
        self.inner.close()


def test_failing_attempts_are_retried_and_recorded(quick_zoo, tmp_path, reference_run, monkeypatch):
    cfg, ref_dir, _ = reference_run
    from evomerge.search import run as run_mod

    made = []

    def flaky_executor(evaluator):
        made.append(Flaky(evaluator))
        return LocalExecutor(made[-1])

    monkeypatch.setattr(run_mod, "LocalExecutor", flaky_executor)
    summary = start_run(cfg, tmp_path / "run", progress=False)
    assert summary.evaluated == 12 and summary.failed == 0
    assert trace(tmp_path / "run") == trace(ref_dir)  # retries changed nothing
    view = read_run(tmp_path / "run")
    assert len(view.failures) == 6 and all(
        f["attempt"] == 1 and "worker lost" in f["error"] for f in view.failures
    )


def test_nan_weights_fail_for_good_and_the_run_goes_on(quick_zoo, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-expert"
    import shutil

    shutil.copytree(quick_zoo.experts["reverse"], bad)
    weights = next(bad.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n in tensors if "mlp" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    cfg = config(quick_zoo, tmp_path, budget=3, optimizer={"name": "random"}, evaluation={"max_retries": 1})
    cfg = cfg.model_copy(
        update={"models": cfg.models.model_copy(update={"sources": [cfg.models.sources[0], str(bad)]})}
    )
    summary = start_run(cfg, tmp_path / "run", progress=False)
    assert summary.evaluated == 3 and summary.failed == 3 and summary.reason == "budget"
    view = read_run(tmp_path / "run")
    assert len(view.failures) == 6  # two attempts each
    assert all("NaN" in r.error and r.failed for r in view.results.values())
    assert torch.isnan(tensors[name]).any()


def test_identical_recipes_are_evaluated_once(quick_zoo, tmp_path, monkeypatch):
    """An optimizer that proposes every genome twice: the second ask is told from the journal."""
    from evomerge.search import optimizers
    from evomerge.search.types import Candidate

    real = optimizers.make_optimizer

    class Twice:
        def __init__(self, inner):
            self.inner, self.name, self.next_id, self.pending, self.told = inner, "twice", 0, None, []

        def ask(self):
            if self.pending is None:
                c = self.inner.ask()
                self.pending = c.genome
            g, self.pending = (self.pending, None) if self.next_id % 2 else (self.pending, self.pending)
            self.next_id += 1
            return Candidate(self.next_id - 1, genome=g)

        def tell(self, ev):
            self.told.append(ev)

        def state(self):
            return {"n": self.next_id}

        def load_state(self, state):
            self.next_id = state["n"]

        def best(self):
            return max(self.told, key=lambda e: e.scalar, default=None)

    made = []
    monkeypatch.setattr(
        optimizers, "make_optimizer", lambda *a, **k: made.append(Twice(real(*a, **k))) or made[-1]
    )
    cfg = config(quick_zoo, tmp_path, budget=3, optimizer={"name": "random"})
    summary = start_run(cfg, tmp_path / "run", progress=False)
    assert summary.evaluated == 3 and summary.cache_hits >= 2
    view = read_run(tmp_path / "run")
    assert len(view.candidates) >= 5 and len(view.results) == 3
    twice = made[0]
    pairs = [(a, b) for a, b in zip(twice.told[::2], twice.told[1::2], strict=False)]
    assert all(a.recipe_hash == b.recipe_hash and a.objectives == b.objectives for a, b in pairs)
    assert all(n == 1 for n in results_per_hash(tmp_path / "run").values())


def test_status_reports_progress(quick_zoo, reference_run):
    from evomerge.search.report import status_text

    _, ref_dir, _ = reference_run
    text = status_text(ref_dir)
    assert "12/12 evaluations" in text and "finished (budget)" in text
    assert "hypervolume" in text and "held-out" in text
    out = subprocess.run(
        [sys.executable, "-m", "evomerge", "status", str(ref_dir)], capture_output=True, text=True, check=True
    ).stdout
    assert "best       candidate" in out and "12/12 evaluations" in out


MODES = {
    "random": ({"kind": "parameters", "method": "ties", "layer_groups": 1}, {"name": "random"}),
    "m2n2-genome": ({"kind": "parameters", "method": "task_arithmetic", "layer_groups": 2},
                    {"name": "m2n2", "settings": {"archive_size": 4}}),
    "nsga2": ({"kind": "parameters", "method": ["ties", "task_arithmetic"], "components": ["attention", "mlp"]},
              {"name": "nsga2", "settings": {"popsize": 4}}),
    "m2n2-models": ({"kind": "models"}, {"name": "m2n2", "settings": {"archive_size": 4}}),
}


@pytest.mark.parametrize("mode", sorted(MODES) + ["dataflow"])
def test_every_mode_runs_and_an_interrupted_run_continues_exactly(quick_zoo, tmp_path, mode):
    """Stop at a small budget, resume with a larger one: the same candidates and results as one run."""
    from evomerge.search.report import status_text

    if mode == "dataflow":
        space = {"kind": "dataflow", "model_a": str(quick_zoo.experts["add"]),
                 "model_b": str(quick_zoo.experts["reverse"]), "repeats": 2, "cost_objective": True}
        optimizer = {"name": "cmaes", "settings": {"popsize": 4}}
    else:
        space, optimizer = MODES[mode]
    cfg = config(quick_zoo, tmp_path, optimizer=optimizer, budget=7, space=space)
    whole = start_run(cfg, tmp_path / "whole", progress=False)
    assert whole.evaluated == 7 and whole.failed == 0
    part = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"evaluations": 3})})
    start_run(part, tmp_path / "parts", progress=False)
    resume_run(tmp_path / "parts", evaluations=7, progress=False)
    assert trace(tmp_path / "parts") == trace(tmp_path / "whole")
    text = status_text(tmp_path / "parts")
    assert "7/7 evaluations" in text and "1 resume(s)" in text
    view = read_run(tmp_path / "whole")
    if mode == "m2n2-models":
        children = [c for c in view.candidates.values() if c.parents]
        assert children, "no crossover child was asked"
        sources = set(cfg.models.sources)
        for c in children:  # a SLERP of two archive members: a source model or an earlier candidate
            assert c.recipe["method"] == "slerp" and len(c.parents) == 2
            models = [s["model"] for s in c.recipe["sources"]]
            assert all(m in sources or m.removeprefix("candidate:") in c.parents for m in models)
    if mode == "dataflow":
        assert any(r.timings["in_place"] == 0.0 for r in view.results.values())  # other layer counts
        assert all(r.cost is not None and r.cost >= 1 for r in view.results.values())


def test_parameter_space_result_as_model_a_of_a_dataflow_search(quick_zoo, tmp_path):
    """Combined PS + DFS: a merge recipe (e.g. the best of a parameter search) is model A of a layer-path
    search; it is materialized once into the run's cache and every path recipe names it by hash."""
    ps = tmp_path / "ps_best.yaml"
    ps.write_text(yaml.safe_dump({
        "method": "task_arithmetic", "base": str(quick_zoo.base),
        "sources": [{"model": str(quick_zoo.experts["add"]), "parameters": {"weight": 0.8}},
                    {"model": str(quick_zoo.experts["reverse"]), "parameters": {"weight": 0.6}}]}))
    space = {"kind": "dataflow", "model_a": str(ps), "model_b": str(quick_zoo.experts["lexicon"]), "repeats": 1}
    cfg = config(quick_zoo, tmp_path, optimizer={"name": "random"}, budget=3, space=space)
    summary = start_run(cfg, tmp_path / "run", progress=False)
    assert summary.evaluated == 3 and summary.failed == 0
    view = read_run(tmp_path / "run")
    refs = {json.dumps(c.recipe).count("candidate:") for c in view.candidates.values()}
    assert min(refs) >= 1
    cached = [p for p in (tmp_path / "run" / "cache").iterdir() if (p / "config.json").exists()]
    assert len(cached) == 1
