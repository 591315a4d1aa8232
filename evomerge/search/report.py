"""Summaries of a run read from its journal: progress, best so far, Pareto fronts, failures (through
ArchiveView), and the helpers that turn journaled results into per-task scores.

Read-only, so it works on a run that is still going as well as on a finished or interrupted one.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.search.store import RunView, split_mean


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


def reference_point(config) -> tuple[float, ...]:
    """The fixed hypervolume reference: 0 for every task score; minus the longest possible path for a
    data-flow cost objective (costs are negated so that every objective is maximised)."""
    ref = (0.0,) * len(config.tasks)
    if config.space.kind == "dataflow" and config.space.cost_objective:
        from evomerge.search.setup import num_layers_of

        ref += (-float(2 * num_layers_of(config.space.model_b) * config.space.repeats),)
    return ref


def status_text(run_dir: str | Path) -> str:
    """A few lines: progress, best so far, front size, hypervolume, failures, what is in flight."""
    from evomerge.search.archive_view import load_archive

    av = load_archive(run_dir)
    view, config = av.run, av.config
    budget = config.budget.model_copy(update=view.budget_update).evaluations
    state = f"finished ({view.ended['reason']})" if view.ended else "not finished (running or interrupted)"
    lines = [
        f"run        {av.run_dir} ({config.name}, optimizer {config.optimizer.name}, seed {config.seed})",
        f"state      {state}; {view.resumes} resume(s); {view.elapsed / 60:.1f} min of search",
        f"progress   {view.evaluated}" + (f"/{budget}" if budget else "") + " evaluations, "
        f"{len(view.candidates)} candidates asked, {len(view.in_flight())} unfinished",
        f"failures   {sum(1 for r in view.results.values() if r.failed)} failed for good, "
        f"{len(view.failures)} failed attempts",
    ]
    if av.candidates:
        best = max(av.candidates, key=lambda e: (av.mean(e), -e.order))
        lines.append(f"best       candidate {best.id} ({best.recipe_hash[:12]}) scalar {av.mean(best):.4f}")
        for values, split in ((best.search, "search"), (best.heldout, "held-out")):
            if values is not None:
                lines.append("           " + "  ".join(f"{n}={v:.3f}" for n, v in zip(av.stems, values, strict=True))
                             + f" ({split})")
        search, held = av.front(), av.front(heldout=True)
        lines.append(f"front      {len(search)} non-dominated on search, hypervolume "
                     f"{av.hypervolume_of(search):.4f}; held-out front {len(held)}, "
                     f"hypervolume {av.hypervolume_of(held, heldout=True):.4f}")
    else:
        lines.append("best       nothing evaluated yet")
    return "\n".join(lines)
