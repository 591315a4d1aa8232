"""Evaluate candidates on a pool of Ray actors: one resident backend per accelerator (or CPU slot).

Each ``EvaluatorActor`` builds the same in-process evaluator the local executor uses (resident backend,
in-place materialization with the shared kernels, source checkpoints kept open) once, at start. A
candidate travels as its recipe (a validated Recipe, pickled: kilobytes, and nothing to re-validate on
arrival) plus the recipes of any earlier candidates it names (lineage) that the actor has not been sent
yet; the actor merges it into its resident model, scores it, and returns per-item scores, timings, and its
node and actor ids.

``RayExecutor`` implements the run loop's Executor: ``capacity`` is the number of live actors times
(1 + ``queue``), so the loop keeps every actor busy as far as the optimizer allows (steady-state
optimizers ask again as soon as a result is in). With ``queue`` >= 1 each busy actor also holds that many
candidates waiting behind the one it evaluates (Ray runs an actor's calls in the order they were sent):
it starts the next one as soon as it returns a result, instead of waiting a driver round trip (result
back, journal, tell, ask, dispatch). Idle actors are always served first. An actor that dies (killed,
out of memory, node lost) costs only its in-flight candidates, which are dispatched again to other actors
(at most ``max_redispatch`` times; a dead worker is not the candidate's fault, so it does not count
against the candidate's retries); the pool then starts a replacement when the cluster has room.

Timings added to each outcome: ``actor_total`` (the actor's time on the candidate), ``idle`` (how long
the actor waited for it after finishing its previous candidate; absent on its first) and ``roundtrip``
(from the driver's dispatch to the result's arrival, time spent waiting in the actor's queue included).

Shared storage is assumed: the run directory (its lineage cache) and model paths must be visible at the
same paths on every node.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.recipe.schema import Recipe
from evomerge.search.types import CANDIDATE_PREFIX

log = logging.getLogger(__name__)


def lineage_closure(recipe: Recipe, store: dict[str, Recipe]) -> dict[str, dict]:
    """Every earlier candidate ``recipe`` names, directly or through its parents (hash -> recipe JSON)."""
    closure = lineage_recipes(recipe, store)
    return {h: r.model_dump(mode="json", exclude_defaults=True) for h, r in closure.items()}


def lineage_recipes(recipe: Recipe, store: dict[str, Recipe]) -> dict[str, Recipe]:
    """Every earlier candidate ``recipe`` names, directly or through its parents (hash -> recipe)."""
    out: dict[str, Recipe] = {}
    todo = [recipe]
    while todo:
        r = todo.pop()
        names = [r.base, r.tokenizer_source, *(s.model for s in r.sources or []),
                 *(s.model for sl in r.slices or [] for s in sl.sources)]
        for name in names:
            if name and name.startswith(CANDIDATE_PREFIX):
                h = name[len(CANDIDATE_PREFIX):]
                if h not in out:
                    if h not in store:
                        raise EvomergeError(f"recipe names candidate {h[:12]}, which this run does not know")
                    out[h] = store[h]
                    todo.append(store[h])
    return out


class _Actor:
    """The body of the Ray actor (plain class, so it can be tested without Ray)."""

    def __init__(self, config_json: dict, run_dir: str):
        import os
        import socket

        from evomerge.search.config import SearchConfig
        from evomerge.search.setup import evaluator_for

        self.config = SearchConfig.model_validate(config_json)
        self.recipes: dict[str, Recipe] = {}
        self.evaluator = evaluator_for(self.config, Path(run_dir), self.recipes)
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._last_end: float | None = None  # when the previous candidate finished
        self._ids = ("", "")
        try:
            import ray

            ctx = ray.get_runtime_context()
            self._ids = (ctx.get_node_id(), ctx.get_actor_id() or "")
        except Exception:  # noqa: BLE001 - outside Ray there are no ids
            pass
        self.evaluator.resident()  # load the backend now, not inside the first candidate's timing

    def ready(self) -> dict:
        return {"pid": self.pid, "host": self.host, "node": self._ids[0], "actor": self._ids[1]}

    def evaluate(self, recipe: Recipe, lineage: dict[str, Recipe]):
        """Score ``recipe``; ``lineage``: recipes of earlier candidates it names (hash -> Recipe)."""
        start = time.perf_counter()
        for h, r in lineage.items():
            self.recipes.setdefault(h, r)
        try:
            outcome = self.evaluator.evaluate(recipe)
        finally:
            idle = None if self._last_end is None else start - self._last_end
            self._last_end = time.perf_counter()
        outcome.timings["actor_total"] = self._last_end - start
        if idle is not None:
            outcome.timings["idle"] = idle
        outcome.worker = f"{self.host}:{self.pid} node={self._ids[0][:12]} actor={self._ids[1][:12]}"
        return outcome


@dataclass
class _Slot:
    handle: Any
    info: dict
    in_flight: int = 0  # candidates sent and not yet back (the one evaluated plus those queued behind it)
    known: set[str] = field(default_factory=set)  # lineage recipes this actor has been sent


@dataclass
class PoolSettings:
    """Resources per actor and pool size; ``num_workers`` None: as many as the cluster's resources allow."""

    num_workers: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    max_redispatch: int = 3
    startup_timeout: float = 600.0
    queue: int = 0  # candidates waiting at each busy actor behind the one it evaluates

    @classmethod
    def for_run(cls, workers, optimizer) -> PoolSettings:
        """The settings of a search config's ``workers`` section for a run of ``optimizer``."""
        w = workers
        queue = w.queue if w.queue is not None else (0 if optimizer.generational else 1)
        return cls(num_workers=w.count, num_cpus=w.cpus, num_gpus=w.gpus, resources=dict(w.resources),
                   max_redispatch=w.max_redispatch, queue=queue)


class RayExecutor:
    """A pool of EvaluatorActors behind the run loop's Executor interface."""

    def __init__(self, config, run_dir: str | Path, store: dict[str, Recipe], settings: PoolSettings | None = None,
                 *, address: str | None = None, actor_cls: type = _Actor):
        import ray

        self.settings = settings or PoolSettings()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        self._ray = ray
        self.config_json = config.model_dump(mode="json")
        self.run_dir = str(run_dir)
        self.store = store
        s = self.settings
        opts: dict[str, Any] = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "max_restarts": 0,
                                "max_task_retries": 0}
        if s.resources:
            opts["resources"] = dict(s.resources)
        self._actor_cls = ray.remote(**opts)(actor_cls)
        want = s.num_workers or self._fits()
        if want < 1:
            raise EvomergeError(f"the Ray cluster has no room for one evaluator ({s.num_cpus} CPU, "
                                f"{s.num_gpus} GPU, {s.resources or 'no custom resources'} each)")
        self.target = want
        self.slots: list[_Slot] = []
        self._start(want)
        self._pending: dict[Any, tuple[int, Recipe, _Slot]] = {}  # object ref -> (key, recipe, slot)
        self._sent: dict[Any, float] = {}  # object ref -> when it was dispatched
        self._starting: dict[Any, Any] = {}  # ready() ref -> actor handle still starting
        self._queue: deque[tuple[int, Recipe]] = deque()
        self._redispatched: dict[int, int] = {}

    # -- pool ------------------------------------------------------------------------------------------

    def _fits(self) -> int:
        s = self.settings
        total = self._ray.cluster_resources()
        counts = []
        if s.num_cpus:
            counts.append(int(total.get("CPU", 0) // s.num_cpus))
        if s.num_gpus:
            counts.append(int(total.get("GPU", 0) // s.num_gpus))
        for k, v in s.resources.items():
            counts.append(int(total.get(k, 0) // v))
        return min(counts) if counts else 1

    def _start(self, n: int) -> None:
        handles = [self._actor_cls.remote(self.config_json, self.run_dir) for _ in range(n)]
        refs = {h.ready.remote(): h for h in handles}
        ready, waiting = self._ray.wait(list(refs), num_returns=len(refs), timeout=self.settings.startup_timeout)
        for ref in ready:
            try:
                info = self._ray.get(ref)
            except self._ray.exceptions.RayError as err:
                log.warning("an evaluator failed to start: %s", err)
                continue
            self.slots.append(_Slot(refs[ref], info))
        for ref in waiting:  # no room (yet): give the request back rather than wait forever
            self._ray.kill(refs[ref])
        if not self.slots:
            raise EvomergeError("no evaluator actor could start on the Ray cluster")
        log.info("%d evaluator actor(s) on %d node(s)", len(self.slots), len({s.info["node"] for s in self.slots}))

    def _replace(self) -> None:
        """Start actors to bring the pool back to its size, without waiting for them: they join when ready
        (``next_finished`` watches their start-up beside the evaluations in flight)."""
        missing = self.target - len(self.slots) - len(self._starting)
        if missing <= 0:
            return
        free = self._ray.available_resources()
        s = self.settings
        room = [int(free.get("CPU", 0) // s.num_cpus)] if s.num_cpus else []
        room += [int(free.get("GPU", 0) // s.num_gpus)] if s.num_gpus else []
        room += [int(free.get(k, 0) // v) for k, v in s.resources.items()]
        for _ in range(min([missing, *room])):
            h = self._actor_cls.remote(self.config_json, self.run_dir)
            self._starting[h.ready.remote()] = h

    def _joined(self, ref) -> None:
        handle = self._starting.pop(ref)
        try:
            info = self._ray.get(ref)
        except self._ray.exceptions.RayError as err:
            log.warning("a replacement evaluator failed to start: %s", err)
            with contextlib.suppress(Exception):
                self._ray.kill(handle)
            return
        self.slots.append(_Slot(handle, info))
        log.info("evaluator %s joined the pool (%d live)", info.get("pid"), len(self.slots))

    @property
    def capacity(self) -> int:
        return max(1, len(self.slots)) * (1 + self.settings.queue)

    @property
    def workers(self) -> list[dict]:
        return [s.info for s in self.slots]

    # -- Executor --------------------------------------------------------------------------------------

    def submit(self, key: int, recipe: Recipe) -> None:
        self._queue.append((key, recipe))
        self._dispatch()

    def _dispatch(self) -> None:
        # level by level: every idle actor gets a candidate before any busy one gets one queued
        for level in range(1 + self.settings.queue):
            for slot in self.slots:
                if not self._queue:
                    return
                if slot.in_flight == level:
                    self._send(slot, *self._queue.popleft())

    def _send(self, slot: _Slot, key: int, recipe: Recipe) -> None:
        lineage = {h: r for h, r in lineage_recipes(recipe, self.store).items() if h not in slot.known}
        sent = time.perf_counter()  # before the call: the actor may start before it returns
        ref = slot.handle.evaluate.remote(recipe, lineage)
        slot.known.update(lineage)
        slot.in_flight += 1
        self._pending[ref] = (key, recipe, slot)
        self._sent[ref] = sent

    def next_finished(self):
        while True:
            self._replace()
            self._dispatch()
            if not self._pending and not self._starting:
                raise EvomergeError("every evaluator actor is gone and none could be started again")
            [ref], _ = self._ray.wait([*self._pending, *self._starting], num_returns=1)
            if ref in self._starting:
                self._joined(ref)
                continue
            key, recipe, slot = self._pending.pop(ref)
            sent = self._sent.pop(ref)
            slot.in_flight -= 1
            try:
                outcome = self._ray.get(ref)
            except self._ray.exceptions.RayActorError as err:  # the worker, not the candidate, failed
                self._lost(slot, key, recipe, err)
                continue
            except self._ray.exceptions.RayTaskError as err:
                slot.known.clear()  # the call may have failed before the actor stored its lineage: send it again
                self._dispatch()
                return key, None, err.as_instanceof_cause() if hasattr(err, "as_instanceof_cause") else err
            except self._ray.exceptions.RayError as err:  # node lost, object lost, ...
                self._lost(slot, key, recipe, err)
                continue
            outcome.timings["roundtrip"] = time.perf_counter() - sent
            self._dispatch()
            return key, outcome, None

    def _lost(self, slot: _Slot, key: int, recipe: Recipe, err: BaseException) -> None:
        log.warning("evaluator %s died with candidate %d in flight: %s", slot.info.get("pid"), key,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        if slot in self.slots:
            self.slots.remove(slot)
        n = self._redispatched.get(key, 0) + 1
        self._redispatched[key] = n
        if n > self.settings.max_redispatch:
            raise EvomergeError(f"candidate {key} lost its worker {n} times; giving up (see the Ray logs)")
        self._queue.appendleft((key, recipe))

    def close(self) -> None:
        for handle in self._starting.values():
            with contextlib.suppress(Exception):
                self._ray.kill(handle)
        self._starting = {}
        for slot in self.slots:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(slot.handle)
        self.slots = []
