"""Discovery quality: baselines against searches at one evaluation budget, several seeds, one run.

    python bench/search_quality.py [--zoo DIR] [--budget 100] [--seeds 0 1 2] [--out DIR]
                                   [--only SUBSTRING...] [--device cpu|cuda] [--no-ray]

``--zoo`` is a folder with the zoo layout: ``base/``, ``experts/<skill>/`` and ``tasks/<skill>.yaml`` —
the tiny zoo (built there by ``evomerge zoo build`` when the folder holds no models yet) or the SmolLM2
experts (``python -m evomerge.zoo.smollm2 DIR --experts``). Every model is scored on every skill.

Baselines: each expert alone, uniform task arithmetic, task arithmetic at weight 1, default TIES and
DARE-TIES. Searches, each with the same budget of evaluations and the same seeds: random search, CMA-ES
in parameter space (TIES and task arithmetic, 3 layer groups), CMA-ES in the data-flow space (a layer path
that starts as the expert with the best search score and may take layers of the second best, 2 repeats,
per-slot scales), M2N2 over task-arithmetic genomes and over whole models. The experts are ranked on the
search split only: the held-out split decides nothing before the final table.

For every search the pick is the candidate with the best *search* scalar (mean over skills); the tables
report its *held-out* score (mean over every skill's held-out items). Intervals are 95% bootstrap
intervals over items: per seed, and for the seed average (each item's score averaged over the seeds'
picks, resampled by item). "vs best baseline" is the paired bootstrap interval of the difference between
the seed-averaged pick and the best baseline, item by item. Hypervolume is of the held-out front over every
candidate a search evaluated, reference 0 for every skill; as a skill missing from every candidate makes
the full-dimensional volume 0, the mean of the volumes of the skill pairs' 2-d fronts is shown beside it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    experts: dict[str, Path]
    tasks: dict[str, Path]


def open_zoo(folder: str | Path) -> Zoo:
    """The models and tasks under ``folder``; builds the tiny zoo there first if it holds no models."""
    root = Path(folder).resolve()
    if not (root / "base").is_dir():
        from evomerge.zoo.build import build_zoo

        built = build_zoo(root)
        return Zoo(root, built.base, dict(built.experts), dict(built.tasks))
    experts = {p.name: p for p in sorted((root / "experts").iterdir()) if p.is_dir()}
    tasks = {s: root / "tasks" / f"{s}.yaml" for s in experts}
    missing = [str(t) for t in tasks.values() if not t.is_file()]
    if len(experts) < 2 or missing:
        raise SystemExit(f"{root}: needs experts/<skill>/ (at least 2) and tasks/<skill>.yaml; missing {missing}")
    return Zoo(root, root / "base", experts, tasks)


def bootstrap(items: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float]:
    idx = rng.integers(0, len(items), size=(n, len(items)))
    means = items[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def config(zoo: Zoo, name, seed, budget, space, optimizer, run_root, args):
    from evomerge.search.config import parse_search_config

    data = {
        "name": name, "seed": seed, "run_dir": str(run_root / f"{name}-s{seed}"),
        "models": {"base": str(zoo.base), "sources": [str(p) for p in zoo.experts.values()]},
        "space": space,
        "tasks": [{"path": str(p)} for p in zoo.tasks.values()],
        "evaluation": {"device": args.device},
        "workers": {"ray": not args.no_ray},
        "optimizer": optimizer,
        "budget": {"evaluations": budget},
    }
    return parse_search_config(data, Path.cwd())


def strategies(zoo: Zoo, ranked: list[str]) -> dict[str, tuple[dict, dict]]:
    """The searches; ``ranked``: the experts' skills, best search score first (the data-flow path's models)."""
    a, b = ranked[:2]
    ties = {"kind": "parameters", "method": "ties", "layer_groups": 3}
    ta = {"kind": "parameters", "method": "task_arithmetic", "layer_groups": 3}
    dfs = {"kind": "dataflow", "model_a": str(zoo.experts[a]), "model_b": str(zoo.experts[b]), "repeats": 2}
    return {
        "random (TIES, 3 groups)": (ties, {"name": "random"}),
        "CMA-ES (TIES, 3 groups)": (ties, {"name": "cmaes"}),
        "CMA-ES (task arithmetic, 3 groups)": (ta, {"name": "cmaes"}),
        f"CMA-ES (data-flow, {a} x {b})": (dfs, {"name": "cmaes"}),
        "M2N2 (task arithmetic genomes)": (ta, {"name": "m2n2"}),
        "M2N2 (model space)": ({"kind": "models"}, {"name": "m2n2", "settings": {"archive_size": 8}}),
    }


def _items(pairs) -> np.ndarray:
    """Per-item scores mapped into [0, 1], concatenated over (metric, scores) pairs in task order."""
    from evomerge.search.store import item_scores

    return np.concatenate([item_scores(metric, scores) for metric, scores in pairs])


def held_items(results: dict, cfg) -> np.ndarray:
    """Every task's held-out per-item scores of one journaled result (JSON), in the config's task order."""
    splits = (results[n][t.heldout_split] for n, t in zip(results, cfg.tasks, strict=True))
    return _items((r["metric"], r["scores"]) for r in splits)


def scored_items(res: dict, tasks, split: str = "heldout_split") -> np.ndarray:
    """The same from ``evaluator.score``'s output (EvalResult objects); ``split``: the tasks' field naming
    the split (``search_split`` for the search items)."""
    return _items((r.metric, r.scores) for r in (res[t.task.name][getattr(t, split)] for t in tasks))


def pick(run_dir: Path, cfg) -> dict:
    """The best-on-search candidate's held-out items, its search scalar, and the held-out hypervolumes."""
    from evomerge.search.archive_view import load_archive
    from evomerge.search.pareto import hypervolume

    av = load_archive(run_dir)
    best = max(av.candidates, key=lambda e: (av.mean(e), -e.order))
    points = np.array([e.heldout for e in av.candidates if e.heldout is not None])
    pairs = [hypervolume(points[:, [i, j]]) for i, j in itertools.combinations(range(points.shape[1]), 2)]
    return {"held": held_items(av.run.results[best.recipe_hash].results, cfg), "search": av.mean(best),
            "hv": hypervolume(points), "hv_pairs": float(np.mean(pairs)), "evaluations": len(av.candidates)}


def baselines(zoo: Zoo, args) -> tuple[dict[str, np.ndarray], list[str]]:
    """Held-out items of every baseline, and the experts' skills ranked by their search-split score (best
    first; ties keep the zoo's order)."""
    from evomerge.recipe.load import parse_recipe
    from evomerge.search.evaluator import InProcessEvaluator, make_backend, score
    from evomerge.search.setup import load_tasks

    cfg = config(zoo, "baseline", 0, 1, {"kind": "models"}, {"name": "m2n2"}, Path("/tmp"), args)
    tasks = load_tasks(cfg)
    ev = InProcessEvaluator(tasks, zoo.base, device=args.device)
    srcs = [str(p) for p in zoo.experts.values()]
    n = len(srcs)

    def recipe(method, weight, **extra):
        params = {"weight": weight} | ({"density": 0.5} if "ties" in method else {})
        return {"method": method, "base": str(zoo.base), **extra,
                "sources": [{"model": m, "parameters": params} for m in srcs]}

    recipes = {
        f"uniform task arithmetic (w=1/{n})": recipe("task_arithmetic", 1 / n),
        "task arithmetic (w=1)": recipe("task_arithmetic", 1.0),
        "default TIES (w=1, density 0.5)": recipe("ties", 1.0),
        "default DARE-TIES (w=1, density 0.5)": recipe("dare_ties", 1.0, seed=0),
    }
    out, search = {}, {}
    for skill, path in zoo.experts.items():
        backend = make_backend("hf", path, device=args.device, dtype=None, batch_size=64, options={})
        res = score(tasks, backend, heldout=True)
        out[f"expert '{skill}' alone"] = scored_items(res, tasks)
        search[skill] = float(scored_items(res, tasks, "search_split").mean())
        del backend
    for name, raw in recipes.items():
        out[name] = scored_items(ev.evaluate(parse_recipe(raw)).results, tasks)
    ev.close()
    return out, sorted(search, key=lambda k: -search[k])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=os.environ.get("EVOMERGE_ZOO", "bench/.cache/zoo"))
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="bench/.cache/bench-search", help="where the runs live: a run already there is reused (and continued if cut short), "
                             "its time shown as 'reused'")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of strategy names to run")
    parser.add_argument("--device", default="cpu", help="evaluation device (cpu, cuda)")
    parser.add_argument("--no-ray", action="store_true", help="evaluate in this process instead of Ray actors")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.device == "cpu":
        torch.set_num_threads(1)
    from evomerge.search.run import resume_run, start_run

    start = time.perf_counter()
    zoo = open_zoo(args.zoo)
    run_root = Path(args.out) / zoo.root.resolve().name
    rng = np.random.default_rng(0)
    device = args.device + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; evaluation on {device}, "
          f"{'in process' if args.no_ray else 'local Ray actors'}; torch {torch.__version__}")
    print(f"zoo {zoo.root} (skills {', '.join(zoo.experts)}); budget {args.budget} evaluations; seeds {args.seeds}")

    base, ranked = baselines(zoo, args)
    n_items = len(next(iter(base.values())))
    print(f"held-out: {n_items} items over {len(zoo.experts)} skills\n")
    print(f"{'baseline':44s} {'held-out [95% CI]':>24s}")
    for name, items in base.items():
        lo, hi = bootstrap(items, rng)
        print(f"{name:44s} {items.mean():8.3f} [{lo:.3f}, {hi:.3f}]")
    best_name = max(base, key=lambda k: base[k].mean())
    best = base[best_name]
    print(f"best baseline: {best_name} ({best.mean():.3f}); experts by search score: {', '.join(ranked)}\n")

    print(f"{'search, per seed':44s} {'held-out [95% CI]':>24s} {'search':>7s} {'HV':>7s} {'HV pairs':>8s} "
          f"{'evals':>5s} {'s':>6s}")
    summary = []
    for name, (space, optimizer) in strategies(zoo, ranked).items():
        if args.only and not any(s in name for s in args.only):
            continue
        picks = []
        for seed in args.seeds:
            slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
            cfg = config(zoo, slug, seed, args.budget, space, optimizer, run_root, args)
            run_dir = Path(cfg.run_dir)
            t = time.perf_counter()
            reused = (run_dir / "journal.jsonl").exists()
            if reused:  # from an earlier run of this benchmark: continued if it was cut short
                resume_run(run_dir, progress=False)
            else:
                start_run(cfg, run_dir, progress=False)
            seconds = time.perf_counter() - t
            p = pick(run_dir, cfg) | {"seconds": seconds}
            picks.append(p)
            lo, hi = bootstrap(p["held"], rng)
            print(f"{name + f' / seed {seed}':44s} {p['held'].mean():8.3f} [{lo:.3f}, {hi:.3f}] {p['search']:7.3f} "
                  f"{p['hv']:7.4f} {p['hv_pairs']:8.4f} {p['evaluations']:5d} {'reused' if reused else f'{seconds:6.0f}'}")
            sys.stdout.flush()
        summary.append((name, picks))

    print(f"\n{'search, over seeds':44s} {'held-out [95% CI]':>24s} {'sd':>6s} {'HV':>7s} {'HV pairs':>8s} "
          f"{'vs best baseline [95% CI]':>27s}")
    for name, picks in summary:
        avg = np.mean([p["held"] for p in picks], axis=0)
        lo, hi = bootstrap(avg, rng)
        diff = avg - best
        dlo, dhi = bootstrap(diff, rng)
        sd = np.std([p["held"].mean() for p in picks], ddof=1) if len(picks) > 1 else float("nan")
        verdict = "better" if dlo > 0 else "worse" if dhi < 0 else "no clear difference"
        print(f"{name:44s} {avg.mean():8.3f} [{lo:.3f}, {hi:.3f}] {sd:6.3f} "
              f"{np.mean([p['hv'] for p in picks]):7.4f} {np.mean([p['hv_pairs'] for p in picks]):8.4f} "
              f"{diff.mean():+7.3f} [{dlo:+.3f}, {dhi:+.3f}] {verdict}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
