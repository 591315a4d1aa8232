"""Summaries of a run read from its journal: progress, best so far, Pareto fronts, failures.

Read-only, so it works on a run that is still going as well as on a finished or interrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from evomerge.search.store import CONFIG, RunView, read_run, split_mean


@dataclass(frozen=True)
class Scored:
    """One evaluated recipe with its per-task means on the search and held-out splits."""

    recipe_hash: str
    first_id: int  # the first candidate id that asked for it
    search: tuple[float, ...]
    heldout: tuple[float, ...] | None
    scalar: float
    cost: float | None
    order: int


def task_means(result: dict, split_of) -> tuple[float, ...] | None:
    """Per-task means (items mapped into [0, 1]) in the given task order; None if a split is missing."""
    out = []
    for task, split in split_of:
        r = result.get(task, {}).get(split) if split else None
        if r is None:
            return None
        out.append(split_mean(r))
    return tuple(out)


def task_names(view: RunView, config) -> list[str]:
    """The tasks' names in config order, read from the journal's results (so a run whose task files moved
    can still be read); from the task files only when nothing has been scored yet."""
    for r in [*view.results.values(), *view.baselines.values()]:
        if not r.failed and len(r.results) == len(config.tasks):
            return list(r.results)
    from evomerge.errors import EvomergeError
    from evomerge.fitness.task import load_task

    try:
        return [load_task(t.path).name for t in config.tasks]
    except (EvomergeError, OSError):  # nothing scored yet and the task files moved
        return [Path(t.path).stem for t in config.tasks]


def scored(view: RunView, config) -> list[Scored]:
    """Every successful evaluation of the run, in evaluation order."""
    names = task_names(view, config)
    weights = [t.weight for t in config.tasks]
    first: dict[str, int] = {}
    for c in sorted(view.candidates.values(), key=lambda c: c.id):
        first.setdefault(c.recipe_hash, c.id)
    out = []
    for r in sorted(view.results.values(), key=lambda r: r.order):
        if r.failed:
            continue
        search = task_means(r.results, [(n, t.search_split) for n, t in zip(names, config.tasks, strict=True)])
        if search is None:
            continue
        heldout = task_means(r.results, [(n, t.heldout_split) for n, t in zip(names, config.tasks, strict=True)])
        scalar = math.fsum(w * s for w, s in zip(weights, search, strict=True)) / sum(weights)
        out.append(Scored(r.recipe_hash, first.get(r.recipe_hash, -1), search, heldout, scalar, r.cost, r.order))
    return out


def objectives(s: Scored, with_cost: bool, heldout: bool = False) -> tuple[float, ...] | None:
    values = s.heldout if heldout else s.search
    if values is None:
        return None
    return (*values, -(s.cost or 0.0)) if with_cost else values


def reference_point(config) -> tuple[float, ...]:
    """The fixed hypervolume reference: 0 for every task score; minus the longest possible path for a
    data-flow cost objective (costs are negated so that every objective is maximised)."""
    ref = (0.0,) * len(config.tasks)
    if config.space.kind == "dataflow" and config.space.cost_objective:
        from evomerge.search.setup import num_layers_of

        ref += (-float(2 * num_layers_of(config.space.model_b) * config.space.repeats),)
    return ref


def fronts(items: list[Scored], with_cost: bool, reference: tuple[float, ...] | None = None):
    """(search archive, held-out archive): ParetoArchive over every evaluation, in evaluation order."""
    from evomerge.search.pareto import ParetoArchive

    search, held = ParetoArchive(reference), ParetoArchive(reference)
    for s in items:
        search.add(s.recipe_hash, objectives(s, with_cost))
        h = objectives(s, with_cost, heldout=True)
        if h is not None:
            held.add(s.recipe_hash, h)
    return search, held


def status_text(run_dir: str | Path) -> str:
    """A few lines: progress, best so far, front size, hypervolume, failures, what is in flight."""
    from evomerge.search.config import load_search_config

    run_dir = Path(run_dir)
    view = read_run(run_dir)
    config = load_search_config(run_dir / CONFIG, check_paths=False)
    with_cost = config.space.kind == "dataflow" and config.space.cost_objective
    items = scored(view, config)
    search, held = fronts(items, with_cost, reference_point(config))
    budget = config.budget.model_copy(update=view.budget_update).evaluations
    names = [Path(t.path).stem for t in config.tasks]
    state = f"finished ({view.ended['reason']})" if view.ended else "not finished (running or interrupted)"
    lines = [
        f"run        {run_dir} ({config.name}, optimizer {config.optimizer.name}, seed {config.seed})",
        f"state      {state}; {view.resumes} resume(s); {view.elapsed / 60:.1f} min of search",
        f"progress   {view.evaluated}" + (f"/{budget}" if budget else "") + " evaluations, "
        f"{len(view.candidates)} candidates asked, {len(view.in_flight())} unfinished",
        f"failures   {sum(1 for r in view.results.values() if r.failed)} failed for good, "
        f"{len(view.failures)} failed attempts",
    ]
    if items:
        best = max(items, key=lambda s: (s.scalar, -s.order))
        lines.append(f"best       candidate {best.first_id} ({best.recipe_hash[:12]}) scalar {best.scalar:.4f}")
        lines.append("           " + "  ".join(f"{n}={v:.3f}" for n, v in zip(names, best.search, strict=True))
                     + " (search)")
        if best.heldout is not None:
            lines.append("           " + "  ".join(f"{n}={v:.3f}" for n, v in zip(names, best.heldout, strict=True))
                         + " (held-out)")
        lines.append(f"front      {len(search.members())} non-dominated on search, hypervolume "
                     f"{search.hypervolume():.4f}; held-out front {len(held.members())}, "
                     f"hypervolume {held.hypervolume():.4f}")
    else:
        lines.append("best       nothing evaluated yet")
    return "\n".join(lines)

