"""The embedded demo: build the tiny zoo, search for merges on local Ray, plot the fronts, export the best.

``evomerge demo --out DIR`` (``make demo``) on a fresh machine: trains the tiny zoo (a base and three
experts, each good at one synthetic skill), runs two short searches on a local Ray cluster with the HF
backend (CMA-ES over TIES coefficients per layer group, and M2N2 over models, whose children are
layer-wise SLERP crossovers), draws each run's Pareto front, exports the candidate with the best
search-split score as a standard checkpoint, and prints a table comparing it with each expert and with
the default merges on held-out items. Everything is cached or resumable: running it again finishes an
interrupted demo instead of starting over.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)
SKILLS = ("add", "reverse", "lexicon")


def _configs(zoo, runs: Path, seed: int, budget: int, quick: bool) -> list:
    from evomerge.search.config import parse_search_config
    from evomerge.search.setup import num_layers_of

    common = {
        "seed": seed,
        "tasks": [{"path": str(zoo.tasks[s])} for s in SKILLS],
        "workers": {"ray": True},
    }
    sources = [str(zoo.experts[s]) for s in SKILLS]
    cmaes = {**common, "name": "demo-cmaes-ties", "run_dir": str(runs / "cmaes-ties"),
             "models": {"base": str(zoo.base), "sources": sources},
             "space": {"kind": "parameters", "method": "ties", "layer_groups": min(3, num_layers_of(str(zoo.base)))},
             "optimizer": {"name": "cmaes"}, "budget": {"evaluations": budget}}
    m2n2 = {**common, "name": "demo-m2n2-models", "run_dir": str(runs / "m2n2-models"),
            "models": {"sources": sources},
            "space": {"kind": "models"},
            "optimizer": {"name": "m2n2", "settings": {"archive_size": 6}},
            "budget": {"evaluations": max(8, budget * 2 // 3)}}
    return [parse_search_config(c, Path("/")) for c in (cmaes, m2n2)]


def run_demo(out: Path, seed: int = 0, *, budget: int = 48, quick: bool = False, workers: int | None = None) -> Path:
    """Run the whole demo under ``out``; returns the exported model's directory."""
    from transformers.utils import logging as hf_logging

    from evomerge.search.export import export_candidate
    from evomerge.search.run import resume_run, start_run
    from evomerge.search.store import JOURNAL, read_run, split_means
    from evomerge.zoo.build import build_zoo

    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    out = Path(out).resolve()
    print(f"[1/4] tiny zoo in {out / 'zoo'} (built once, then cached)", flush=True)
    zoo = build_zoo(out / "zoo", seed=seed, quick=quick)
    t_zoo = time.perf_counter() - start
    picks = []
    for i, cfg in enumerate(_configs(zoo, out / "runs", seed, budget, quick)):
        if workers is not None:
            cfg = cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"count": workers})})
        print(f"[2/4] search {i + 1}/2: {cfg.name} ({cfg.optimizer.name}, {cfg.space.kind} space, "
              f"{cfg.budget.evaluations} evaluations, local Ray)", flush=True)
        run_dir = Path(cfg.run_dir)
        if (run_dir / JOURNAL).exists():
            resume_run(run_dir, progress=True)
        else:
            start_run(cfg, run_dir, progress=True)
        picks.append((cfg, read_run(run_dir)))
    _shutdown_ray()

    print("[3/4] Pareto fronts", flush=True)
    plots = []
    for cfg, view in picks:
        png = out / f"pareto-{Path(cfg.run_dir).name}.png"
        try:
            from evomerge.search.archive_plot import plot_archive
            from evomerge.search.archive_view import load_archive

            plot_archive(load_archive(view.run_dir), png)
            plots.append(png)
        except ImportError as err:  # matplotlib missing: the rest of the demo still stands
            log.warning("no plot (%s)", err)

    # The pick: the best search-split mean over both runs; held-out items never influence it.
    best = None
    for cfg, view in picks:
        for h, r in view.results.items():
            if r.failed:
                continue
            s = split_means(r.results, "search")
            score = sum(s.values()) / len(s)
            if best is None or score > best[0]:
                cid = min(c.id for c in view.candidates.values() if c.recipe_hash == h)
                best = (score, cfg, view, cid, r)
    _, cfg, view, cid, result = best
    print(f"[4/4] exporting candidate {cid} of {cfg.name}", flush=True)
    model = export_candidate(view.run_dir, str(cid), out / "best-model", overwrite=True, progress=False)

    same = [name for name, b in view.baselines.items() if b.recipe_hash == result.recipe_hash]
    label = f"best found: {cfg.name} #{cid}" + (f" (= {same[0]})" if same else "")
    base_view = picks[0][1]
    alone = sorted((n, b) for n, b in base_view.baselines.items() if n.endswith(" alone") and not b.failed)
    merges = sorted((n, b) for n, b in base_view.baselines.items() if not n.endswith(" alone") and not b.failed)
    rows = [(label, result), *alone, *merges]
    tasks = sorted(split_means(result.results, "heldout"))
    width = max(10, *(len(t) for t in tasks))
    print()
    print("held-out accuracy (items the searches never saw); the pick is the best search-split mean")
    print(f"{'model':52s} " + " ".join(f"{t:>{width}s}" for t in tasks) + "     mean")
    for name, r in rows:
        m = split_means(r.results, "heldout")
        print(f"{name[:52]:52s} " + " ".join(f"{m.get(t, math.nan):{width}.3f}" for t in tasks)
              + f" {sum(m.values()) / max(1, len(m)):8.3f}")
    print()
    for _, view_i in picks:
        print(f"run      {view_i.run_dir}  ({view_i.evaluated} evaluations; `evomerge status` / `evomerge pareto`)")
    for png in plots:
        print(f"plot     {png}")
    print(f"model    {model}  (evomerge_recipe.yaml, README.md model card)")
    print(f"done in {time.perf_counter() - start:.0f} s (zoo {t_zoo:.0f} s)")
    return model


def _shutdown_ray() -> None:
    with contextlib.suppress(ImportError):
        import ray

        if ray.is_initialized():
            ray.shutdown()
