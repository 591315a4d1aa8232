"""Discovery quality on the tiny zoo: baselines against searches at one evaluation budget, several seeds.

    python bench/search_quality.py [--zoo DIR] [--budget 100] [--seeds 0 1 2] [--out DIR]

Builds (or reuses) the full tiny zoo, scores the baselines (each expert alone, uniform task arithmetic,
default TIES, default DARE-TIES) and runs each search strategy with the same evaluation budget and seeds.
For every search the pick is the candidate with the best *search* scalar; the table reports its
*held-out* score (mean over the three skills' held-out items, 150 items), with a 95% bootstrap interval
over items, and the search-split score it was picked on. Hypervolume (reference 0) is of the held-out
front over all candidates the search evaluated. Every figure comes from this one run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

SKILLS = ("add", "reverse", "lexicon")


def bootstrap(items: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float]:
    idx = rng.integers(0, len(items), size=(n, len(items)))
    means = items[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def config(zoo, name, seed, budget, space, optimizer, run_root):
    from evomerge.search.config import parse_search_config

    data = {
        "name": name, "seed": seed, "run_dir": str(run_root / f"{name}-s{seed}"),
        "models": {"base": str(zoo.base), "sources": [str(zoo.experts[s]) for s in SKILLS]},
        "space": space,
        "tasks": [{"path": str(zoo.tasks[s])} for s in SKILLS],
        "optimizer": optimizer,
        "budget": {"evaluations": budget},
    }
    return parse_search_config(data, Path("/"))


STRATEGIES = {
    "random (TIES, 3 groups)": ({"kind": "parameters", "method": "ties", "layer_groups": 3}, {"name": "random"}),
    "CMA-ES (TIES, 3 groups)": ({"kind": "parameters", "method": "ties", "layer_groups": 3}, {"name": "cmaes"}),
    "CMA-ES (task arithmetic, 3 groups)": ({"kind": "parameters", "method": "task_arithmetic", "layer_groups": 3},
                                           {"name": "cmaes"}),
    "M2N2 (task arithmetic genomes)": ({"kind": "parameters", "method": "task_arithmetic", "layer_groups": 3},
                                       {"name": "m2n2"}),
    "M2N2 (model space)": ({"kind": "models"}, {"name": "m2n2", "settings": {"archive_size": 8}}),
}


def pick(run_dir: Path, cfg):
    """(held-out per-item scores, search scalar, held-out hypervolume) of the best-on-search candidate."""
    from evomerge.search.report import fronts, scored
    from evomerge.search.store import item_scores, read_run

    view = read_run(run_dir)
    items = scored(view, cfg)
    best = max(items, key=lambda s: (s.scalar, -s.order))
    rec = view.results[best.recipe_hash].results
    held = np.concatenate([item_scores(r["metric"], r["scores"]) for r in
                           (rec[t]["heldout"] for t in rec)])
    _, held_front = fronts(items, False)
    return held, best.scalar, held_front.hypervolume()


def baselines(zoo):
    from evomerge.fitness.backends.hf import HFBackend
    from evomerge.recipe.load import parse_recipe
    from evomerge.search.evaluator import InProcessEvaluator, ScoredTask
    from evomerge.search.setup import load_tasks
    from evomerge.search.store import item_scores

    cfg = config(zoo, "baseline", 0, 1, {"kind": "models"}, {"name": "m2n2"}, Path("/tmp"))
    tasks: list[ScoredTask] = load_tasks(cfg)
    ev = InProcessEvaluator(tasks, zoo.base)
    srcs = [str(zoo.experts[s]) for s in SKILLS]
    recipes = {
        "uniform task arithmetic (w=1/3)": {"method": "task_arithmetic", "base": str(zoo.base),
                                            "sources": [{"model": m, "parameters": {"weight": 1 / 3}} for m in srcs]},
        "task arithmetic (w=1)": {"method": "task_arithmetic", "base": str(zoo.base),
                                  "sources": [{"model": m, "parameters": {"weight": 1.0}} for m in srcs]},
        "default TIES (w=1, density 0.5)": {"method": "ties", "base": str(zoo.base),
                                            "sources": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}}
                                                        for m in srcs]},
        "default DARE-TIES (w=1, density 0.5)": {"method": "dare_ties", "base": str(zoo.base), "seed": 0,
                                                 "sources": [{"model": m, "parameters": {"weight": 1.0,
                                                                                         "density": 0.5}}
                                                             for m in srcs]},
    }
    out = {}
    for skill in SKILLS:
        backend = HFBackend(zoo.experts[skill], batch_size=64)
        from evomerge.search.evaluator import score

        res = score(tasks, backend, heldout=True)
        out[f"expert '{skill}' alone"] = np.concatenate(
            [item_scores(r.metric, r.scores) for r in (res[t.task.name]["heldout"] for t in tasks)])
    for name, raw in recipes.items():
        res = ev.evaluate(parse_recipe(raw)).results
        out[name] = np.concatenate([item_scores(r.metric, r.scores) for r in (res[t.task.name]["heldout"]
                                                                              for t in tasks)])
    ev.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default=os.environ.get("EVOMERGE_ZOO", ".cache/zoo"))
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=".cache/bench-search")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of strategy names to run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from evomerge.search.run import start_run
    from evomerge.zoo.build import build_zoo

    start = time.perf_counter()
    zoo = build_zoo(args.zoo)
    run_root = Path(args.out)
    rng = np.random.default_rng(0)
    print(f"tiny zoo {zoo.root}; budget {args.budget} evaluations; seeds {args.seeds}; "
          f"held-out: 3 skills x 50 items\n")
    print(f"{'strategy':40s} {'held-out (95% CI)':>24s} {'search':>7s} {'HV held-out':>11s}")
    for name, items in baselines(zoo).items():
        lo, hi = bootstrap(items, rng)
        print(f"{name:40s} {items.mean():8.3f} [{lo:.3f}, {hi:.3f}]   {'-':>7s} {'-':>11s}")
    for name, (space, optimizer) in STRATEGIES.items():
        if args.only and not any(s in name for s in args.only):
            continue
        per_seed = []
        for seed in args.seeds:
            slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
            cfg = config(zoo, slug, seed, args.budget, space, optimizer, run_root)
            run_dir = Path(cfg.run_dir)
            if not (run_dir / "journal.jsonl").exists():
                start_run(cfg, run_dir, progress=False)
            held, search, hv = pick(run_dir, cfg)
            lo, hi = bootstrap(held, rng)
            per_seed.append(held.mean())
            print(f"{name + f' seed {seed}':40s} {held.mean():8.3f} [{lo:.3f}, {hi:.3f}]   {search:7.3f} {hv:11.4f}")
            sys.stdout.flush()
        print(f"{name + ' mean over seeds':40s} {np.mean(per_seed):8.3f} (sd {np.std(per_seed, ddof=1) if len(per_seed) > 1 else math.nan:.3f})")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
