"""The search loop: ask the optimizer, evaluate, tell, journal; and resume after any interruption.

One loop serves new and resumed runs. A run directory holds the config (paths absolute), the journal
and the latest optimizer snapshot (see evomerge.search.store). Resuming loads the snapshot (if any),
then keeps asking: every optimizer draw derives from (run seed, counter), so the candidates asked after
the snapshot come out exactly as before the interruption; each is checked against its journal record,
and one whose recipe already has a result in the journal is told from the journal, not re-evaluated.
Only candidates that were in flight run again. The same mechanism makes identical recipes free: a
recipe hash with a result is never evaluated twice.

Evaluation goes through an ``Executor`` (submit / next finished), so the loop does not care whether
candidates are scored in this process (``LocalExecutor``) or on a pool of workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import math
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe.load import parse_recipe
from evomerge.recipe.schema import Recipe
from evomerge.search.config import SearchConfig, load_search_config
from evomerge.search.evaluator import Outcome
from evomerge.search.journal import FORMAT, Journal, JournalError, read_snapshot, write_snapshot
from evomerge.search.setup import Search, build_search
from evomerge.search.store import CONFIG, JOURNAL, LOCK, SNAPSHOT, RunView, read_run
from evomerge.search.types import Candidate, Evaluation

log = logging.getLogger(__name__)
STALL_LIMIT = 1000  # consecutive asks whose recipes were all evaluated already: the search has converged


class Executor(Protocol):
    """Evaluates recipes somewhere; the loop keeps at most ``capacity`` in flight."""

    capacity: int

    def submit(self, key: int, recipe: Recipe) -> None: ...

    def next_finished(self) -> tuple[int, Outcome | None, BaseException | None]:
        """(key, outcome, None) or (key, None, error) for one submitted recipe."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Evaluates in this process, one at a time, in submission order."""

    capacity = 1

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self._queue: list[tuple[int, Recipe]] = []

    def submit(self, key: int, recipe: Recipe) -> None:
        self._queue.append((key, recipe))

    def next_finished(self):
        key, recipe = self._queue.pop(0)
        try:
            return key, self.evaluator.evaluate(recipe), None
        except Exception as err:  # noqa: BLE001 - any failure of one candidate is recorded, the run goes on
            return key, None, err

    def close(self) -> None:
        self.evaluator.close()


def make_executor(config: SearchConfig, search: Search) -> Executor:
    """The executor the config asks for: a Ray actor pool, or this process."""
    w = config.workers
    if not w.ray:
        return LocalExecutor(search.make_evaluator())
    from evomerge.search.ray_pool import PoolSettings, RayExecutor

    settings = PoolSettings.for_run(w, search.optimizer)
    return RayExecutor(config, search.run_dir, search.recipes, settings, address=w.address)


@dataclass
class RunSummary:
    run_dir: Path
    evaluated: int
    reason: str
    best: Evaluation | None
    elapsed: float
    failed: int
    cache_hits: int = 0


def identity_hash(config: SearchConfig) -> str:
    """What a journal must match to be continued: the config without its budget, run directory and
    workers (a run may resume on another cluster)."""
    return config.model_copy(update={"budget": None, "run_dir": None, "workers": None}).config_hash()


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EvomergeError(f"another process is running the search in '{run_dir}'") from None
        yield
    finally:
        os.close(fd)


def start_run(config: SearchConfig, run_dir: str | Path | None = None, *, executor: Executor | None = None,
              progress: bool = True) -> RunSummary:
    """Start a new search in ``run_dir`` (default: the config's run_dir) and run it to its budget."""
    target = Path(run_dir or config.run_dir or "")
    if not str(target):
        raise EvomergeError("no run directory: set 'run_dir' in the config or pass --run-dir")
    if (target / JOURNAL).exists():
        view = read_run(target)
        same = view.start and view.start.get("identity") == identity_hash(config)
        hint = (f"`evomerge resume {target}` continues it" if same
                else "it was started from a different config; choose another run directory")
        raise EvomergeError(f"'{target}' already holds a run ({view.evaluated} evaluations): {hint}")
    target.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        (target / CONFIG).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        with Journal(target / JOURNAL) as journal:
            journal.append({"kind": "start", "format": FORMAT, "identity": identity_hash(config),
                            "config_hash": config.config_hash(), "seed": config.seed, "name": config.name,
                            "t": time.time()})
        return _Loop(config, target, executor, progress).run()


def resume_run(run_dir: str | Path, *, evaluations: int | None = None, wall_time: float | None = None,
               executor: Executor | None = None, progress: bool = True, workers=None) -> RunSummary:
    """Continue the search in ``run_dir``; ``evaluations`` / ``wall_time`` raise its budget."""
    run_dir = Path(run_dir)
    view = read_run(run_dir)  # refuses a directory without a journal
    config = load_search_config(run_dir / CONFIG)
    if view.start.get("identity") != identity_hash(config):
        raise JournalError(f"'{run_dir}': the journal was written by a different config than {CONFIG} "
                           "(edited after the start?); refusing to mix two searches in one journal")
    if view.start.get("format") != FORMAT:
        raise JournalError(f"'{run_dir}': journal format {view.start.get('format')} is not {FORMAT}")
    budget = config.budget.model_copy(update=view.budget_update)
    update = {k: v for k, v in (("evaluations", evaluations), ("wall_time", wall_time)) if v is not None}
    budget = budget.model_copy(update=update)
    config = config.model_copy(update={"budget": budget})
    if workers is not None:  # e.g. another cluster address than the one the run started on
        config = workers(config)
    with _locked(run_dir):
        with Journal(run_dir / JOURNAL) as journal:
            journal.append({"kind": "resume", "t": time.time(), "budget": update or None,
                            "in_flight": [c.id for c in view.in_flight()]})
        return _Loop(config, run_dir, executor, progress).run()


def _results_json(outcome: Outcome) -> dict:
    """An Outcome's TaskResults as the journal stores them: task -> split -> dict."""
    return {task: {split: r.model_dump(mode="json") for split, r in splits.items()}
            for task, splits in outcome.results.items()}


def to_evaluation(search: Search, cid: int, recipe_hash: str, results: dict, *, failed: bool,
                  cost: float | None) -> Evaluation:
    """The optimizer's view of a result: per-task means, weighted scalar, per-item scores (search splits)."""
    from evomerge.search.store import item_scores

    n_obj = len(search.tasks) + (1 if search.cost_objective else 0)
    if failed:
        n_items = sum(len(t.task.items(t.search_split)) for t in search.tasks)
        return Evaluation(cid, recipe_hash, (0.0,) * n_obj, -math.inf, (0.0,) * n_items, failed=True)
    objectives, items, scalar, total = [], [], 0.0, 0.0
    for t in search.tasks:
        r = results[t.task.name][t.search_split]
        s = item_scores(r["metric"], r["scores"])
        mean = math.fsum(s) / len(s)
        objectives.append(mean)
        items.extend(s)
        scalar += t.weight * mean
        total += t.weight
    if search.cost_objective:
        objectives.append(-(cost or 0.0))
    return Evaluation(cid, recipe_hash, tuple(objectives), scalar / total, tuple(items))


class _Loop:
    def __init__(self, config: SearchConfig, run_dir: Path, executor: Executor | None, progress: bool):
        self.config = config
        self.run_dir = run_dir
        self.progress = progress
        self.search = build_search(config, run_dir)
        if executor is not None and not hasattr(executor, "submit"):
            executor = executor(self.search)  # a factory: it needs the search (e.g. its lineage store)
        self.executor = executor or make_executor(config, self.search)
        self.journal = Journal(run_dir / JOURNAL)

    # -- state restored from the journal -----------------------------------------------------------

    def _restore(self, view: RunView) -> tuple[set[int], list[Candidate]]:
        """Load the snapshot if any: (ids told, candidates asked but not told, to be told first)."""
        opt = self.search.optimizer
        try:
            snap = read_snapshot(self.run_dir / SNAPSHOT)
        except JournalError as err:
            log.warning("%s; replaying the journal from the start instead", err)
            snap = None
        if not snap or snap.get("identity") != identity_hash(self.config):
            return set(), []
        opt.load_state(snap["optimizer"])
        told = set(snap["told"])
        pending = []
        for cid in snap["asked"]:
            if cid in told:
                continue
            rec = view.candidates.get(cid)
            if rec is None:
                raise JournalError(f"snapshot names candidate {cid}, which the journal does not have")
            pending.append(self._candidate_from(rec))
        self.asked_ids = list(snap["asked"])
        return told, pending

    @staticmethod
    def _candidate_from(rec) -> Candidate:
        recipe = None if rec.genome is not None else parse_recipe(rec.recipe, f"journal candidate {rec.id}")
        genome = tuple(rec.genome) if rec.genome is not None else None
        return Candidate(rec.id, genome=genome, recipe=recipe, parents=tuple(rec.parents), info=rec.info)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        view = read_run(self.run_dir)
        self.view = view
        self.asked_ids: list[int] = []
        told, pending = self._restore(view)
        for rec in view.candidates.values():
            self.search.remember(rec.recipe_hash, rec.recipe)
        self.told = told
        self.failed = sum(1 for r in view.results.values() if r.failed)
        self.cache_hits = 0
        session_start = time.perf_counter()
        self.elapsed0 = view.elapsed
        if self.config.evaluation.baselines:
            self._baselines()
        budget = self.config.budget
        bar = self.bar = self._bar(view.evaluated)
        in_flight: dict[int, tuple[Candidate, str, Recipe, float | None]] = {}
        waiting: dict[str, list[tuple[Candidate, float | None]]] = {}  # same recipe as one in flight
        queue = list(pending)  # asked before the interruption, not yet told: first in line
        stall = 0
        reason = None
        try:
            while reason is None:
                elapsed = self.elapsed0 + time.perf_counter() - session_start
                while len(in_flight) < self.executor.capacity:
                    if budget.wall_time is not None and elapsed >= budget.wall_time:
                        reason = "wall_time"
                    elif budget.evaluations is not None and \
                            len(self.view.results) + len(in_flight) >= budget.evaluations:
                        reason = "budget"
                    elif stall >= STALL_LIMIT:
                        reason = "converged"
                    if reason is not None:
                        break
                    cand = queue.pop(0) if queue else self.search.optimizer.ask()
                    if cand is None:
                        break  # the optimizer waits for results in flight
                    recipe, cost = self._recipe(cand)
                    h = recipe.content_hash()
                    self._journal_ask(cand, recipe, h)
                    known = self.view.known(h)
                    if known is not None:  # evaluated before: told from the journal, for free
                        if h not in self.view.results:  # a baseline's result becomes the search's
                            self._copy_baseline(cand, h, known, cost)
                        self._tell(cand, h, known.results, known.failed, cost)
                        self.cache_hits += 1
                        stall += 1
                        continue
                    stall = 0
                    if any(h == f[1] for f in in_flight.values()):
                        waiting.setdefault(h, []).append((cand, cost))
                        continue
                    in_flight[cand.id] = (cand, h, recipe, cost)
                    self.executor.submit(cand.id, recipe)
                if not in_flight:
                    if reason is None:
                        raise EvomergeError(f"optimizer '{self.search.optimizer.name}' proposed nothing while "
                                            "no candidate was in flight")
                    break
                reason = None  # finish what is in flight before stopping
                cid, outcome, err = self.executor.next_finished()
                cand, h, recipe, cost = in_flight[cid]
                if err is not None:
                    if self._failure(cand, h, recipe, cost, err):
                        continue  # resubmitted: another attempt
                    results, failed = {}, True
                else:
                    results, failed = _results_json(outcome), False
                    self._append({"kind": "result", "id": cid, "hash": h, "results": results,
                                  "timings": outcome.timings, "worker": outcome.worker, "cost": cost,
                                  "elapsed": self.elapsed0 + time.perf_counter() - session_start,
                                  "t": time.time()})
                del in_flight[cid]
                self._tell(cand, h, results, failed, cost)
                for other, other_cost in waiting.pop(h, []):
                    self._tell(other, h, results, failed, other_cost)
                    self.cache_hits += 1
                bar.update(1)
                best = self.search.optimizer.best()
                if best is not None:
                    bar.set_postfix(best=f"{best.scalar:.3f}", failed=self.failed)
        finally:
            bar.close()
            elapsed = self.elapsed0 + time.perf_counter() - session_start
            self.executor.close()
        self.journal.append({"kind": "end", "reason": reason, "elapsed": elapsed, "t": time.time(),
                             "evaluated": len(self.view.results)})
        self.journal.close()
        return RunSummary(self.run_dir, len(self.view.results), reason, self.search.optimizer.best(), elapsed,
                          self.failed, self.cache_hits)

    def _baselines(self) -> None:
        """Score each source alone and the default merges once, before the search (not told to it)."""
        todo = [(name, r) for name, r in self.search.baselines() if name not in self.view.baselines]
        queue = [(-(i + 1), name, r) for i, (name, r) in enumerate(todo)]
        in_flight: dict[int, tuple[str, Recipe]] = {}
        while queue or in_flight:
            while queue and len(in_flight) < self.executor.capacity:
                key, name, recipe = queue.pop(0)
                in_flight[key] = (name, recipe)
                self.executor.submit(key, recipe)
            key, outcome, err = self.executor.next_finished()
            name, recipe = in_flight.pop(key)
            data = recipe.model_dump(mode="json", exclude_defaults=True)
            rec = {"kind": "baseline", "name": name, "hash": recipe.content_hash(), "recipe": data, "t": time.time()}
            if err is not None:
                rec["error"] = f"{type(err).__name__}: {err}"
                log.warning("baseline '%s' failed: %s", name, rec["error"])
            else:
                rec.update(results=_results_json(outcome), timings=outcome.timings, worker=outcome.worker)
            self._append(rec)

    def _copy_baseline(self, cand: Candidate, h: str, known, cost) -> None:
        self._append({"kind": "result", "id": cand.id, "hash": h, "results": known.results,
                      "timings": known.timings, "worker": known.worker, "cost": cost, "from": "baseline",
                      "elapsed": self.elapsed0, "t": time.time()})
        self.bar.update(1)

    def _append(self, rec: dict) -> None:
        """Journal one record (durably), then replay it into the in-memory view, as a reader would."""
        self.journal.append(rec)
        self.view.apply(rec)

    def _bar(self, done: int):
        from tqdm.auto import tqdm

        total = self.config.budget.evaluations
        return tqdm(total=total, initial=done, desc=f"search {self.config.name}", unit="eval",
                    disable=not self.progress)

    def _recipe(self, cand: Candidate) -> tuple[Recipe, float | None]:
        if cand.recipe is not None:
            return cand.recipe, None
        space = self.search.space
        return space.decode(cand.genome), (space.cost(cand.genome) if self.search.cost_objective else None)

    def _journal_ask(self, cand: Candidate, recipe: Recipe, h: str) -> None:
        known = self.view.candidates.get(cand.id)
        if known is not None:
            if known.recipe_hash != h:
                raise JournalError(
                    f"candidate {cand.id} differs from its journal record (recipe {h[:12]} vs "
                    f"{known.recipe_hash[:12]}): the search is not reproducible from this journal "
                    "(changed code or nondeterministic optimizer)")
        else:
            self._append({"kind": "ask", "id": cand.id, "hash": h,
                          "recipe": recipe.model_dump(mode="json", exclude_defaults=True),
                          "genome": list(cand.genome) if cand.genome is not None else None,
                          "parents": list(cand.parents), "info": cand.info, "t": time.time()})
        self.search.remember(h, recipe)
        if cand.id not in self.asked_ids:
            self.asked_ids.append(cand.id)

    def _failure(self, cand: Candidate, h: str, recipe: Recipe, cost: float | None, err: BaseException) -> bool:
        """Journal one failed attempt; True if the candidate gets another attempt."""
        attempts = 1 + sum(1 for f in self.view.failures if f["hash"] == h)
        text = f"{type(err).__name__}: {err}"
        rec = {"kind": "failure", "id": cand.id, "hash": h, "attempt": attempts, "error": text,
               "trace": "".join(traceback.format_exception(err))[-4000:], "t": time.time()}
        self._append(rec)
        log.warning("candidate %d failed (attempt %d): %s", cand.id, attempts, text)
        gc.collect()
        if attempts <= self.config.evaluation.max_retries:
            self.executor.submit(cand.id, recipe)
            return True
        self._append({"kind": "failed", "id": cand.id, "hash": h, "error": text, "cost": cost, "t": time.time()})
        self.failed += 1
        return False

    def _tell(self, cand: Candidate, h: str, results: dict, failed: bool, cost: float | None) -> None:
        ev = to_evaluation(self.search, cand.id, h, results, failed=failed, cost=cost)
        self.search.optimizer.tell(ev)
        self.told.add(cand.id)
        write_snapshot(self.run_dir / SNAPSHOT, {
            "identity": identity_hash(self.config), "optimizer": self.search.optimizer.state(),
            "asked": self.asked_ids, "told": sorted(self.told), "t": time.time()})
