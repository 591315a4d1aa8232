"""A run directory read back: the journal replayed into candidates, results, failures and the archive.

Used by the run loop (resume), ``evomerge status`` and anything that reads a run, including one that is
still going: reading never writes. Layout of a run directory::

    config.yaml      the search config, paths absolute (written at start, never changed)
    journal.jsonl    the append-only event journal (evomerge.search.journal)
    snapshot.json    the latest optimizer snapshot (an optimization; the journal is the truth)
    cache/           lineage materializations (model-space candidates), rebuildable from the journal
    lock             held (flock) by the process running the search
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.search.journal import Journal, JournalError

CONFIG = "config.yaml"
JOURNAL = "journal.jsonl"
SNAPSHOT = "snapshot.json"
CACHE = "cache"
LOCK = "lock"


def split_mean(result: dict[str, Any]) -> float:
    """The mean of one TaskResult's (as a dict) per-item scores, mapped into [0, 1] by ``item_scores``."""
    s = item_scores(result["metric"], result["scores"])
    return math.fsum(s) / len(s)


def split_means(results: dict[str, dict[str, dict[str, Any]]], split: str) -> dict[str, float]:
    """Task name -> mean score on ``split``, for every task of a ResultRecord's results that has it."""
    return {task: split_mean(splits[split]) for task, splits in results.items() if split in splits}


def item_scores(metric: str, scores: list[float]) -> list[float]:
    """Per-item scores mapped into [0, 1] (higher is better): accuracies as they are, mean log-probability
    per token as exp(logprob), the geometric-mean token probability."""
    if metric == "logprob_per_token":
        return [math.exp(s) if math.isfinite(s) else 0.0 for s in scores]
    return [min(1.0, max(0.0, float(s))) if math.isfinite(s) else 0.0 for s in scores]


@dataclass
class CandidateRecord:
    """Everything the journal says about one candidate id."""

    id: int
    recipe_hash: str
    recipe: dict[str, Any]
    genome: list[float] | None
    parents: list[str]
    info: dict[str, Any]
    asked_at: float | None = None


@dataclass
class ResultRecord:
    """A finished evaluation of one recipe hash (shared by every candidate id with that hash)."""

    recipe_hash: str
    results: dict[str, dict[str, dict[str, Any]]]  # task -> split -> TaskResult as a dict
    timings: dict[str, float]
    worker: str
    failed: bool = False
    error: str | None = None
    order: int = 0  # position among finished evaluations (journal order)
    cost: float | None = None


@dataclass
class RunView:
    """The journal of ``run_dir`` replayed."""

    run_dir: Path
    start: dict[str, Any] | None = None
    candidates: dict[int, CandidateRecord] = field(default_factory=dict)
    results: dict[str, ResultRecord] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    resumes: int = 0
    ended: dict[str, Any] | None = None
    elapsed: float = 0.0  # seconds of search recorded in results/end records
    budget_update: dict[str, Any] = field(default_factory=dict)  # budget raised by `evomerge resume`
    baselines: dict[str, ResultRecord] = field(default_factory=dict)  # name -> result, outside the search
    baseline_recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> recipe JSON

    def known(self, recipe_hash: str) -> ResultRecord | None:
        """The finished evaluation of a recipe, by the search or as a baseline."""
        if recipe_hash in self.results:
            return self.results[recipe_hash]
        return next((b for b in self.baselines.values() if b.recipe_hash == recipe_hash and not b.failed), None)

    @property
    def evaluated(self) -> int:
        """Recipes evaluated (finished or failed for good); cache hits do not count."""
        return len(self.results)

    def apply(self, rec: dict[str, Any]) -> None:
        """Replay one journal record into this view (reading a journal, and the run loop as it writes)."""
        kind = rec["kind"]
        if kind == "start":
            self.start = rec
        elif kind == "ask":
            self.candidates[rec["id"]] = CandidateRecord(rec["id"], rec["hash"], rec["recipe"], rec.get("genome"),
                                                         rec.get("parents", []), rec.get("info", {}), rec.get("t"))
        elif kind in ("result", "failed"):
            if rec["hash"] not in self.results:
                self.results[rec["hash"]] = ResultRecord(
                    rec["hash"], rec.get("results", {}), rec.get("timings", {}), rec.get("worker", ""),
                    failed=kind == "failed", error=rec.get("error"), order=len(self.results), cost=rec.get("cost"))
            self.elapsed = max(self.elapsed, rec.get("elapsed", 0.0))
        elif kind == "baseline":
            self.baselines[rec["name"]] = ResultRecord(rec["hash"], rec.get("results", {}), rec.get("timings", {}),
                                                       rec.get("worker", ""), failed=bool(rec.get("error")),
                                                       error=rec.get("error"))
            self.baseline_recipes[rec["name"]] = rec["recipe"]
        elif kind == "failure":
            self.failures.append(rec)
        elif kind == "resume":
            self.resumes += 1
            self.ended = None
            self.budget_update.update(rec.get("budget") or {})
        elif kind == "end":
            self.ended = rec
            self.elapsed = max(self.elapsed, rec.get("elapsed", 0.0))

    def in_flight(self) -> list[CandidateRecord]:
        """Candidates asked whose recipe has no result yet (they are re-run on resume)."""
        return [c for c in self.candidates.values() if c.recipe_hash not in self.results]


def read_run(run_dir: str | Path) -> RunView:
    """Replay the journal of ``run_dir`` (read-only)."""
    run_dir = Path(run_dir)
    path = run_dir / JOURNAL
    if not path.exists():
        raise JournalError(f"'{run_dir}' is not a run directory (no {JOURNAL})")
    view = RunView(run_dir)
    for rec in Journal(path).read():
        view.apply(rec)
    if view.start is None:
        raise JournalError(f"{path}: the journal has no start record")
    return view
