"""Worker utilization and per-candidate overhead of the Ray evaluation pool, measured in one run.

    python bench/ray_utilization.py [--zoo DIR] [--workers 2] [--budget 40] [--delay 1.0]
                                    [--rows all|overhead]

On a local Ray cluster, evaluator actors score tiny-zoo merges (``--zoo`` may also name the SmolLM2 zoo
that ``evomerge zoo smollm2 DIR --experts`` builds: base, experts, tasks). To make evaluation times heterogeneous
(as they are between short and long answers, or models of different depth), each candidate also sleeps
U(0, delay) seconds inside the actor, drawn from its recipe hash. For M2N2 (steady state) and CMA-ES
(popsize a multiple of the worker count) the same search runs twice: with the asynchronous loop, and
behind a barrier that dispatches a batch of `workers` candidates and waits for all of them (the
generation-barrier baseline).

Utilization = sum of the actors' busy time (materialize + evaluate, as each actor measured it) /
(workers x wall time from the first dispatch to the last result); evaluations per hour = evaluations /
that wall time. The asynchronous loop sends candidates ahead as a search would (M2N2: one waiting
behind each busy actor; CMA-ES: none); the barrier baseline never does.

Overhead per candidate = (dispatch + materialization) / evaluation time, measured without the
artificial delay (on the tiny zoo one evaluation takes a fraction of a second, so fixed costs weigh more
than they would on a real model). Dispatch is what the worker loses between candidates: the time an
actor waits after returning one result until it starts its next candidate (its first candidate, which
waits for the run to start, is left out). It is measured twice, M2N2 with nothing sent ahead (the actor
waits for the driver's full round trip: result back, journal, tell, ask, send) and with one candidate
sent ahead (the default for M2N2). Also printed: everything but scoring, (actor time - evaluation) /
evaluation. ``--rows overhead`` runs only these rows. They use one actor fewer than ``--workers`` (at
least one) unless ``--overhead-workers`` says otherwise: the driver then has a core of its own, as on a
cluster's head node, and the dispatch time measures Ray's round trip rather than the driver waiting for
a busy core.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from evomerge.search.ray_pool import _Actor

SKILLS = ("add", "reverse", "lexicon")


class SlowActor(_Actor):
    """The real evaluator plus U(0, delay) seconds per candidate, fixed by the recipe."""

    delay = 1.0

    def evaluate(self, recipe, lineage):
        start = time.perf_counter()
        out = super().evaluate(recipe, lineage)
        if self.delay:
            fields = recipe.model_dump(mode="json", exclude_defaults=True)
            u = int.from_bytes(hashlib.sha256(repr(sorted(fields.items())).encode()).digest()[:4], "little")
            time.sleep(self.delay * u / 2**32)
        out.timings["actor_total"] = time.perf_counter() - start
        return out


class Barrier:
    """Wraps an executor: hand out a batch of `capacity` candidates, then wait until all are back."""

    def __init__(self, inner):
        self.inner = inner
        self.width = inner.capacity
        self.in_flight = 0
        self.open = True

    @property
    def capacity(self) -> int:
        return self.width if self.open else self.in_flight

    def submit(self, key, recipe):
        self.in_flight += 1
        if self.in_flight >= self.width:
            self.open = False
        self.inner.submit(key, recipe)

    def next_finished(self):
        out = self.inner.next_finished()
        self.in_flight -= 1
        if self.in_flight == 0:
            self.open = True
        return out

    def close(self):
        self.inner.close()


def config(zoo, run_dir, optimizer, budget, workers):
    from evomerge.search.config import parse_search_config

    return parse_search_config({
        "name": "bench", "seed": 0, "run_dir": str(run_dir),
        "models": {"base": str(zoo.base), "sources": [str(zoo.experts[s]) for s in SKILLS]},
        "space": {"kind": "parameters", "method": "task_arithmetic", "layer_groups": 3},
        "tasks": [{"path": str(zoo.tasks[s])} for s in SKILLS],
        "optimizer": optimizer, "budget": {"evaluations": budget},
        "evaluation": {"heldout": "none"},
        "workers": {"ray": True, "count": workers},
    }, Path("/"))


def measure(zoo, root, name, optimizer, budget, workers, delay, barrier, queue=None):
    """One search on a fresh pool; ``queue``: candidates sent ahead per actor (None: the run's default)."""
    from evomerge.search.ray_pool import PoolSettings, RayExecutor
    from evomerge.search.run import start_run
    from evomerge.search.store import read_run

    run_dir = root / name
    cfg = config(zoo, run_dir, optimizer, budget, workers)
    SlowActor.delay = delay

    def executor(search):
        settings = PoolSettings.for_run(cfg.workers, search.optimizer)
        if barrier or queue is not None:
            settings = dataclasses.replace(settings, queue=0 if barrier else queue)
        pool = RayExecutor(cfg, run_dir, search.recipes, settings, actor_cls=SlowActor)
        return Barrier(pool) if barrier else pool

    start_run(cfg, run_dir, executor=executor, progress=False)
    view = read_run(run_dir)
    results = list(view.results.values())
    asked = {c.recipe_hash: c.asked_at for c in view.candidates.values()}
    first = min(asked[r.recipe_hash] for r in results)
    ends = [rec["t"] for rec in _results(run_dir)]
    wall = max(ends) - first
    busy = sum(r.timings["actor_total"] for r in results)
    return busy / (workers * wall), wall, results


def overhead_row(results, label):
    """Per-candidate dispatch (an actor's wait between candidates), materialization and their share."""
    later = [r for r in results if "idle" in r.timings]  # not an actor's first candidate
    ev = statistics.mean(r.timings["evaluate"] for r in later)
    mat = statistics.mean(r.timings["materialize"] for r in later)
    disp = statistics.mean(r.timings["idle"] for r in later)
    rest = statistics.mean(r.timings["actor_total"] - r.timings["evaluate"] for r in later)
    return (f"{label:24s} {len(later):10d} {ev * 1000:11.0f} {mat * 1000:14.1f} {disp * 1000:11.2f} "
            f"{(disp + mat) / ev:9.1%} {rest * 1000:14.1f}")


def load_zoo(path):
    """The tiny zoo at ``path`` (built there if missing), or a SmolLM2 zoo already built there."""
    from evomerge.zoo.build import ZooPaths, build_zoo

    root = Path(path).resolve()  # the search config reads model paths against /
    if (root / "base" / "evomerge-source.json").is_file():  # the SmolLM2 zoo (evomerge.zoo.smollm2)
        experts = {s: root / "experts" / s for s in SKILLS}
        tasks = {s: root / "tasks" / f"{s}.yaml" for s in SKILLS}
        missing = [str(p) for p in (*experts.values(), *tasks.values()) if not p.exists()]
        if missing:
            raise SystemExit(f"{root}: no experts or tasks ({', '.join(missing)}); build them with "
                             "`evomerge zoo smollm2 DIR --experts`")
        return ZooPaths(root=root, base=root / "base", experts=experts, tasks=tasks,
                        manifest=root / "manifest.json")
    return build_zoo(root)


def _results(run_dir):
    from evomerge.search.journal import Journal

    return [r for r in Journal(Path(run_dir) / "journal.jsonl").read() if r["kind"] == "result"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default=os.environ.get("EVOMERGE_ZOO", ".cache/zoo"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--rows", choices=("all", "overhead"), default="all")
    parser.add_argument("--overhead-workers", type=int, default=None,
                        help="actors for the overhead row (default: workers - 1, at least 1: the driver keeps a core)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from evomerge.checkpoint.reader import Checkpoint

    zoo = load_zoo(args.zoo)
    with Checkpoint(zoo.base) as ck:
        size = f"{ck.num_layers} layers, hidden {ck.config.get('hidden_size')}, {ck.nbytes / 2**20:.1f} MiB"
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    w = args.workers
    print(f"local Ray, {w} evaluator actors, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"zoo {zoo.root} ({size}); {args.budget} evaluations per row; "
          f"extra delay U(0, {args.delay}) s per candidate\n")
    rows = [("M2N2 (steady state)", {"name": "m2n2", "settings": {"archive_size": 8}}),
            (f"CMA-ES (popsize {2 * w})", {"name": "cmaes", "settings": {"popsize": 2 * w}})]
    try:
        if args.rows == "all":
            print(f"{'search':36s} {'loop':9s} {'utilization':>11s} {'wall s':>7s} {'evals/hour':>10s}")
        for label, opt in rows if args.rows == "all" else []:
            for barrier in (False, True):
                name = f"{opt['name']}-{'barrier' if barrier else 'async'}"
                util, wall, _ = measure(zoo, root, name, opt, args.budget, w, args.delay, barrier)
                print(f"{label:36s} {'barrier' if barrier else 'async':9s} {util:11.1%} {wall:7.1f} "
                      f"{args.budget / wall * 3600:10.0f}")
        ow = args.overhead_workers or max(1, w - 1)
        m2n2 = rows[0][1]
        print(f"\nper candidate, no extra delay (M2N2, {ow} actor(s), {args.budget} candidates; means over every "
              "candidate but each actor's first):")
        print(f"{'sent ahead per actor':24s} {'candidates':>10s} {'evaluate ms':>11s} {'materialize ms':>14s} "
              f"{'dispatch ms':>11s} {'overhead':>9s} {'actor - eval ms':>14s}")
        for queue in (0, 1):
            util, wall, results = measure(zoo, root, f"overhead-{queue}", m2n2, args.budget, ow, 0.0, False, queue)
            print(overhead_row(results, f"{queue}"))
        order = sorted(results, key=lambda r: r.order)
        later = statistics.median(r.timings["materialize"] for r in order[1:]) if len(order) > 1 else float("nan")
        slowest = max(order, key=lambda r: r.timings["materialize"])
        print(f"materialize (1 sent ahead): first candidate {order[0].timings['materialize'] * 1000:.1f} ms (any "
              f"kernel compiles included), median of the rest {later * 1000:.1f} ms, slowest "
              f"{slowest.timings['materialize'] * 1000:.1f} ms (candidate {slowest.order + 1} of {len(order)})")
        print(f"search throughput without extra delay, 1 sent ahead: {len(results) / wall * 3600:.0f} evaluations "
              f"per hour ({ow} actor(s), utilization {util:.1%})")
        print(f"load average now {os.getloadavg()[0]:.2f}")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
