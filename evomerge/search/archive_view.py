"""What a run found: every evaluated candidate and baseline as per-task scores, the Pareto front, and the
hypervolume over evaluations; ``evomerge pareto RUN_DIR [--plot FILE.png] [--heldout]``.

Read-only (the journal is replayed, never written), so it works on a run that is still going (candidates
in flight simply have no result yet) as on a finished or interrupted one, and on a run whose models or
task files have moved: task names come from the journal's results, the config is read without checking
paths. Scores are per-task means of item scores mapped into [0, 1] (``store.item_scores``); a data-flow
run with a cost objective adds the path length, to minimise (negated inside the Pareto machinery).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.search.pareto import ParetoArchive, non_dominated
from evomerge.search.report import reference_point, task_means, task_names
from evomerge.search.store import CONFIG, ResultRecord, RunView, read_run

if TYPE_CHECKING:  # the config module loads torch (through evomerge.recipe): kept out of `evomerge --help`
    from evomerge.search.config import SearchConfig

SOURCE, MERGE, CANDIDATE = "source alone", "default merge", "candidate"
HV_MARKS = (0.10, 0.25, 0.50, 1.00)  # fractions of the evaluations at which hypervolume is tabled


@dataclass(frozen=True)
class Entry:
    """One evaluated recipe: a search candidate (``ids`` of the candidates that asked for it) or a
    baseline (``name``; kind SOURCE or MERGE). ``search``/``heldout`` are per-task means in task order."""

    kind: str
    recipe_hash: str
    search: tuple[float, ...]
    heldout: tuple[float, ...] | None
    cost: float | None = None
    order: int = -1  # position among the run's evaluations (-1: a baseline)
    ids: tuple[int, ...] = ()
    name: str = ""
    parents: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def id(self) -> int | None:
        """The first candidate id that asked for this recipe (None for a baseline)."""
        return self.ids[0] if self.ids else None

    @property
    def label(self) -> str:
        return str(self.id) if self.ids else self.name

    def scores(self, heldout: bool = False) -> tuple[float, ...] | None:
        return self.heldout if heldout else self.search


@dataclass
class ArchiveView:
    """A run's evaluations as objective vectors (see the module docstring); build with ``load_archive``."""

    run_dir: Path
    config: SearchConfig
    run: RunView
    tasks: list[str]  # task names, in the config's order
    stems: list[str]  # task file names without .yaml (accepted wherever a task name is)
    weights: list[float]
    with_cost: bool
    reference: tuple[float, ...]
    candidates: list[Entry]  # successful evaluations, in evaluation order
    baselines: list[Entry]
    reference_note: str = ""

    # -- objectives ------------------------------------------------------------------------------------

    @property
    def objective_names(self) -> list[str]:
        return self.tasks + (["path length"] if self.with_cost else [])

    def objectives(self, e: Entry, heldout: bool = False) -> tuple[float, ...] | None:
        """Maximised objectives: per-task means, then minus the cost when the run has a cost objective."""
        values = e.scores(heldout)
        if values is None:
            return None
        return (*values, -(e.cost or 0.0)) if self.with_cost else values

    def mean(self, e: Entry, heldout: bool = False, weights: list[float] | None = None) -> float | None:
        """Weighted mean of the task scores (the config's weights unless given)."""
        values = e.scores(heldout)
        w = self.weights if weights is None else weights
        if values is None or sum(w) <= 0:
            return None
        return math.fsum(a * b for a, b in zip(w, values, strict=True)) / math.fsum(w)

    def task_index(self, name: str) -> int:
        """Index of a task given by its name or its file's stem; unknown names list the valid ones."""
        for names in (self.tasks, self.stems):
            if name in names and names.count(name) == 1:
                return names.index(name)
        valid = ", ".join(f"{t} (or {s})" if s != t else t for t, s in zip(self.tasks, self.stems, strict=True))
        raise EvomergeError(f"unknown task '{name}'; the run's tasks are: {valid}")

    # -- fronts ----------------------------------------------------------------------------------------

    def front(self, heldout: bool = False, among: list[Entry] | None = None) -> list[Entry]:
        """Non-dominated candidates (search or held-out objectives), in evaluation order; candidates without
        held-out scores take no part in a held-out front."""
        pool = [e for e in (self.candidates if among is None else among) if self.objectives(e, heldout)]
        if not pool:
            return []
        keep = non_dominated([self.objectives(e, heldout) for e in pool])
        return [pool[i] for i in keep]

    def hypervolume_history(self, heldout: bool = False) -> list[float]:
        """Hypervolume of the front after each evaluation (one value per candidate, evaluation order)."""
        archive, out = ParetoArchive(self.reference), []
        for e in self.candidates:
            point = self.objectives(e, heldout)
            if point is not None:
                archive.add(e.recipe_hash, point)
            out.append(archive.hypervolume())
        return out

    def hypervolume_of(self, entries: list[Entry], heldout: bool = False) -> float:
        """Hypervolume of a set of entries (e.g. the sources alone) against the run's reference point."""
        from evomerge.search.pareto import hypervolume

        points = [p for p in (self.objectives(e, heldout) for e in entries) if p is not None]
        return hypervolume(points, self.reference) if points else 0.0

    # -- baselines -------------------------------------------------------------------------------------

    def best_baseline(self, kind: str, weights: list[float] | None = None) -> Entry | None:
        """The baseline of ``kind`` with the best held-out mean (search mean where there is none)."""
        pool = [b for b in self.baselines if b.kind == kind]

        def key(b: Entry):
            held = self.mean(b, True, weights)
            return (held is not None, held if held is not None else self.mean(b, False, weights) or 0.0)

        return max(pool, key=key, default=None)

    def id_of(self, recipe_hash: str) -> str:
        """A readable name for a recipe hash: candidate id, baseline name, or the hash's first 8 digits."""
        for e in self.candidates:
            if e.recipe_hash == recipe_hash:
                return str(e.id)
        for b in self.baselines:
            if b.recipe_hash == recipe_hash:
                return b.name
        return recipe_hash[:8]


def _entry(kind: str, r: ResultRecord, config: SearchConfig, names: list[str], **extra) -> Entry | None:
    pairs = list(zip(names, config.tasks, strict=True))
    search = task_means(r.results, [(n, t.search_split) for n, t in pairs])
    if r.failed or search is None:
        return None
    heldout = task_means(r.results, [(n, t.heldout_split) for n, t in pairs])
    return Entry(kind, r.recipe_hash, search, heldout, r.cost, **extra)


def load_archive(run_dir: str | Path) -> ArchiveView:
    """Read a run directory (read-only) into an ArchiveView."""
    from evomerge.search.config import load_search_config

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    config = load_search_config(run_dir / CONFIG, check_paths=False)
    names = task_names(run, config)
    with_cost = config.space.kind == "dataflow" and bool(config.space.cost_objective)
    ids: dict[str, list[int]] = {}
    records: dict[str, Any] = {}
    for c in sorted(run.candidates.values(), key=lambda c: c.id):
        ids.setdefault(c.recipe_hash, []).append(c.id)
        records.setdefault(c.recipe_hash, c)
    candidates = []
    for r in sorted(run.results.values(), key=lambda r: r.order):
        first = records.get(r.recipe_hash)
        e = _entry(CANDIDATE, r, config, names, order=r.order, ids=tuple(ids.get(r.recipe_hash, ())),
                   parents=tuple(first.parents) if first else (), info=dict(first.info) if first else {})
        if e is not None:
            candidates.append(e)
    baselines = []
    for name, r in run.baselines.items():
        e = _entry(SOURCE if name.endswith(" alone") else MERGE, r, config, names, name=name)
        if e is not None:
            baselines.append(e)
    note = ""
    try:
        reference = reference_point(config)
    except (EvomergeError, OSError):  # a cost objective whose model moved: its layer count is unknown
        worst = max((e.cost or 0.0 for e in candidates), default=1.0)
        reference = (0.0,) * len(names) + ((-float(worst),) if with_cost else ())
        note = "reference path length: the longest seen (the model's layer count could not be read)"
    return ArchiveView(run_dir, config, run, names, [Path(t.path).stem for t in config.tasks],
                       [t.weight for t in config.tasks], with_cost, tuple(reference), candidates, baselines, note)


# -- the table ------------------------------------------------------------------------------------------


def origin(e: Entry) -> str:
    """Where a candidate came from, from its ask record's info: 'gen 2 #1', 'split 3 mix 0.45', ..."""
    info = dict(e.info)
    parts = []
    if "generation" in info:
        parts.append(f"gen {info.pop('generation')}" + (f" #{info.pop('index')}" if "index" in info else ""))
    for k, v in info.items():
        if k == "restart" and not v:
            continue
        if isinstance(v, bool):
            parts.append(k if v else f"not {k}")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.2f}")
        elif isinstance(v, str) and "/" in v:
            parts.append(f"{k} {Path(v).name}")
        else:
            parts.append(f"{k} {v}")
    return ", ".join(parts)


def _pair(a: float | None, b: float | None) -> str:
    return f"{a:.3f}/" + ("-" if b is None else f"{b:.3f}") if a is not None else "-"


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    """Plain-text columns (``right``: indices of right-aligned columns)."""
    right = right or set()
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(r):
        pairs = enumerate(zip(r, widths, strict=True))
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in pairs]
        return "  ".join(cells).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *[line(r) for r in rows]]


def pareto_text(av: ArchiveView, heldout: bool = False) -> str:
    """The front as a table (each score as search/held-out), the best baselines, and hypervolume over time."""
    run = av.run
    state = f"finished ({run.ended['reason']})" if run.ended else "not finished (running or interrupted)"
    basis = "held-out" if heldout else "search"
    lines = [f"run      {av.run_dir} ({av.config.name}, optimizer {av.config.optimizer.name}): {state}",
             f"         {len(av.candidates)} evaluated, {len(run.in_flight())} in flight, "
             f"{sum(1 for r in run.results.values() if r.failed)} failed"]
    front = av.front(heldout)
    lines.append(f"front    {len(front)} candidate(s) non-dominated on {basis} scores (no other candidate beats "
                 "one on a task without losing on another)")
    lines.append("         every score below is search/held-out: the mean over the task's items, 0..1")
    headers = ["id", "strategy", "origin", *av.tasks, "mean"] + (["path length"] if av.with_cost else [])
    headers.append("parents")
    rows = []
    ordered = sorted(front, key=lambda e: -(av.mean(e, heldout) or 0.0))
    for e in ordered:
        rows.append(_row(av, e, av.config.optimizer.name, origin(e),
                         ", ".join(av.id_of(p) for p in e.parents)))
    for kind, what in ((SOURCE, "best source alone"), (MERGE, "best default merge")):
        b = av.best_baseline(kind)
        if b is not None:
            rows.append(_row(av, b, what, b.name, ""))
    right = set(range(3, 3 + len(av.tasks) + 1 + int(av.with_cost))) | {0}
    lines += ["", *table(headers, rows, right)] if rows else ["", "nothing evaluated yet"]
    lines += ["", *hypervolume_lines(av)]
    if av.reference_note:
        lines.append(f"({av.reference_note})")
    return "\n".join(lines)


def _row(av: ArchiveView, e: Entry, strategy: str, where: str, parents: str) -> list[str]:
    cells = [e.label if e.ids else "--", strategy, where]
    held = e.heldout or (None,) * len(av.tasks)
    cells += [_pair(s, h) for s, h in zip(e.search, held, strict=True)]
    cells.append(_pair(av.mean(e), av.mean(e, True)))
    if av.with_cost:
        cells.append("-" if e.cost is None else f"{e.cost:g}")
    return [*cells, parents]


def hypervolume_lines(av: ArchiveView) -> list[str]:
    """Hypervolume after 10/25/50/100% of the evaluations, on search and held-out scores."""
    n = len(av.candidates)
    if n == 0:
        return ["hypervolume  nothing evaluated yet"]
    marks = [(p, max(1, math.ceil(p * n))) for p in HV_MARKS]
    headers = ["hypervolume", *[f"{int(p * 100)}% ({k})" for p, k in marks], "sources alone"]
    rows = []
    for heldout, what in ((False, "search"), (True, "held-out")):
        hist = av.hypervolume_history(heldout)
        if heldout and not any(e.heldout for e in av.candidates):
            continue
        sources = [b for b in av.baselines if b.kind == SOURCE]
        rows.append([what, *[f"{hist[k - 1]:.4f}" for _, k in marks],
                     f"{av.hypervolume_of(sources, heldout):.4f}" if sources else "-"])
    ref = ", ".join(f"{v:g}" for v in av.reference)
    return [*table(headers, rows, set(range(1, len(headers)))),
            f"(hypervolume of the front after N evaluations, against the reference point ({ref}): a candidate "
            "scoring 0 on a task adds nothing; 'sources alone': that of the source models by themselves)"]


# -- command line -----------------------------------------------------------------------------------------


def _pareto_cmd(args: argparse.Namespace) -> int:
    av = load_archive(args.run_dir)
    print(pareto_text(av, heldout=args.heldout))
    if args.plot:
        from evomerge.search.archive_plot import plot_archive

        out = plot_archive(av, args.plot, heldout=args.heldout)
        print(f"\nwrote {out}")
    return 0


def add_pareto_parser(sub) -> argparse.ArgumentParser:
    """Register ``evomerge pareto RUN_DIR [--plot FILE.png] [--heldout]``."""
    p = sub.add_parser("pareto", help="the Pareto front of a run, the best baselines and hypervolume over time",
                       description="Table the candidates no other candidate beats on every task (search "
                                   "scores; --heldout: held-out scores), next to the best source model alone "
                                   "and the best default merge; hypervolume after 10/25/50/100%% of the "
                                   "evaluations. Read-only: works on a run that is still going.")
    p.add_argument("run_dir", help="a search run directory")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="also draw the front (needs matplotlib)")
    p.add_argument("--heldout", action="store_true", help="the front on held-out scores instead of search")
    p.set_defaults(func=_pareto_cmd)
    return p
