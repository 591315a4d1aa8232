"""Materialize a candidate recipe and score it on the fitness tasks, in this process.

``InProcessEvaluator`` keeps one resident backend (HF by default) loaded from a reference checkpoint. A
candidate whose merged checkpoint has the same tensors (names, shapes) and layer count as the resident
model is merged tensor by tensor with the shared kernels and copied into the resident model in place: no
checkpoint is written and the model is never reloaded. Anything else (a data-flow path with another
layer count) is merged into a scratch checkpoint and loaded into a fresh backend for that candidate.

Source checkpoints stay open across candidates (headers parsed once, weight files memory-mapped once) in a
``CheckpointCache``, which reopens a checkpoint whose files changed on disk. Candidates of one structure
(same models, method, slices; other parameter values) share a plan skeleton (``SkeletonCache``): per
candidate only its parameters are resolved and checked.

The evaluator never decides what to try next; it only turns a Recipe into per-item scores.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.recipe.schema import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredTask:
    """A task as a search scores it: the loaded Task plus its weight and splits."""

    task: Any  # evomerge.fitness.task.Task
    weight: float
    search_split: str
    heldout_split: str | None


@dataclass
class Outcome:
    """Scores of one candidate: ``results[task][split]`` is a TaskResult; timings in seconds."""

    results: dict[str, dict[str, Any]]
    timings: dict[str, float]
    worker: str


def make_backend(kind: str, model_path: Path, *, device: str, dtype: str | None, batch_size: int,
                 options: dict[str, Any]):
    """A fitness backend of ``kind`` ('hf' or 'vllm') serving ``model_path``."""
    from evomerge.fitness.backends import backend_class

    cls = backend_class(kind)
    if kind == "hf":
        return cls(model_path, device=device, dtype=dtype, batch_size=batch_size, **options)
    return cls(model_path, dtype=dtype, **options)


def score(tasks: Sequence[ScoredTask], backend, *, heldout: bool) -> dict[str, dict[str, Any]]:
    """Evaluate every task's search split (and held-out split when asked) on ``backend``."""
    from evomerge.fitness.evaluate import evaluate

    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        splits = [t.search_split] + ([t.heldout_split] if heldout and t.heldout_split else [])
        out[t.task.name] = {s: evaluate(t.task, s, backend) for s in splits}
    return out


class InProcessEvaluator:
    """Scores recipes on a resident backend (see the module docstring)."""

    def __init__(self, tasks: Sequence[ScoredTask], reference: str | Path, *, backend: str = "hf",
                 device: str = "cpu", dtype: str | None = None, batch_size: int = 64, heldout: bool = True,
                 backend_options: dict[str, Any] | None = None, resolver=None, scratch: str | Path | None = None):
        self.tasks = list(tasks)
        self.reference = Path(reference)
        self.kind = backend
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.heldout = heldout
        self.options = dict(backend_options or {})
        self.resolver = resolver
        self.scratch = Path(scratch) if scratch else None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._checkpoints = None  # CheckpointCache, made with the backend
        self._skeletons = None  # SkeletonCache over those checkpoints
        self._backend = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._layers: int | None = None

    def resident(self):
        if self._backend is None:
            from evomerge.checkpoint.reader import CheckpointCache
            from evomerge.kernels import fused
            from evomerge.plan import SkeletonCache
            from evomerge.util.memory import reuse_large_allocations

            fused.expect_repeats()  # every candidate merges the same kernel structures
            reuse_large_allocations()  # each candidate's merged tensors reuse the last one's freed memory
            if self._checkpoints is None:
                self._checkpoints = CheckpointCache()
                self._skeletons = SkeletonCache()
            ck = self._checkpoints.open(self.reference)
            shapes = {n: tuple(ck.meta(n).shape) for n in ck.names}
            layers = ck.num_layers
            self._backend = make_backend(self.kind, self.reference, device=self.device, dtype=self.dtype,
                                         batch_size=self.batch_size, options=self.options)
            self._shapes, self._layers = shapes, layers
        return self._backend

    def evaluate(self, recipe: Recipe) -> Outcome:
        """Materialize ``recipe`` and score it; raises whatever goes wrong (the run loop retries)."""
        from evomerge.merge import merge_tensor
        from evomerge.plan import build_plan

        start = time.perf_counter()
        if self.resolver is not None:
            recipe = self.resolver.resolve(recipe)
        backend = self.resident()
        plan = build_plan(recipe, Path("/"), seed=recipe.seed, checkpoints=self._checkpoints,
                          skeletons=self._skeletons)
        try:
            in_place = (
                {j.out.name: tuple(j.out.shape) for j in plan.jobs} == self._shapes
                and (plan.layer_origin is None or len(plan.layer_origin) == self._layers)
            )
            if in_place:
                # merged on the backend's device when it is an accelerator (no host round trip)
                device = self.device if self.device.startswith("cuda") else "cpu"
                # sources read straight from the cached mappings; the backend copies every result
                tensors = {job.out.name: merge_tensor(plan, job, device, borrow=True) for job in plan.jobs}
                backend.load_weights(tensors)
                del tensors
                materialized = time.perf_counter()
                results = score(self.tasks, backend, heldout=self.heldout)
            else:
                results, materialized = self._fresh(plan)
        finally:
            plan.close()
        done = time.perf_counter()
        return Outcome(results, {"materialize": materialized - start, "evaluate": done - materialized,
                                 "in_place": float(in_place)}, self.worker)

    def _fresh(self, plan):
        """Merge into a scratch checkpoint and score it on a backend of its own."""
        from evomerge.merge import run_merge

        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="candidate-", dir=self.scratch))
        try:
            out = run_merge(plan, tmp / "model", progress=False)
            materialized = time.perf_counter()
            backend = make_backend(self.kind, out, device=self.device, dtype=self.dtype,
                                   batch_size=self.batch_size, options=self.options)
            try:
                return score(self.tasks, backend, heldout=self.heldout), materialized
            finally:
                close = getattr(backend, "close", None)
                if close is not None:
                    close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()
        self._backend = None
        if self._checkpoints is not None:
            self._checkpoints.close()
            self._checkpoints = self._skeletons = None
