"""Turn a recipe into a merge plan: one job per output tensor, every check done before any work.

Planning opens the checkpoints (headers only), checks architectures, tensor names and shapes, resolves
every parameter for every tensor and validates it against the method's bounds. Problems are reported
here, before a byte of output is written.

It runs in two parts: a skeleton (``evomerge.plan_skeleton``: every tensor's inputs, shapes, spec and
context, and every check of the recipe's structure against the headers) and the plan of one recipe on it
(its parameter values resolved and checked, here). A search plans recipe after recipe of one structure:
``SkeletonCache`` keeps the skeleton.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from pydantic import ValidationError

from evomerge.checkpoint.reader import Checkpoint, CheckpointCache
from evomerge.checkpoint.writer import TensorSpec
from evomerge.errors import CheckpointError, RecipeError
from evomerge.kernels.params import MethodParams
from evomerge.kernels.registry import MergeMethod, TensorContext, get_method
from evomerge.plan_skeleton import DTYPES, InputRef, Skeleton, build_skeleton, scope
from evomerge.recipe.schema import Recipe
from evomerge.recipe.values import resolve

log = logging.getLogger(__name__)
__all__ = ["DTYPES", "InputRef", "MergePlan", "SkeletonCache", "TensorJob", "build_plan"]


@dataclass(frozen=True)
class TensorJob:
    """How one output tensor is made."""

    out: TensorSpec
    inputs: tuple[InputRef, ...]
    base: InputRef | None
    model_params: tuple[MethodParams, ...]
    global_params: MethodParams
    ctx: TensorContext
    copy: bool = False  # non-float tensor: copied from the first input
    vocab_rows: int | None = None  # rows common to all inputs when vocabulary sizes differ


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    model_names: list[str]
    checkpoints: list[Checkpoint]
    donor: int
    jobs: list[TensorJob]
    layer_origin: list[int] | None
    out_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    owns_checkpoints: bool = True  # False: they belong to a CheckpointCache, which closes them

    @property
    def input_bytes(self) -> int:
        """Bytes read from the source checkpoints by the whole merge."""
        total = 0
        for job in self.jobs:
            refs = list(job.inputs) + ([job.base] if job.base else [])
            total += sum(self._nbytes(r) for r in refs)
        return total

    def _nbytes(self, ref: InputRef) -> int:
        m = self.checkpoints[ref.model].meta(ref.name)
        return m.end - m.start if m.end else 0

    def close(self) -> None:
        if self.owns_checkpoints:
            for c in self.checkpoints:
                c.close()


def _resolve_path(model: str, root: Path) -> Path:
    p = Path(model).expanduser()
    return p if p.is_absolute() else (root / p)


def build_plan(recipe: Recipe, root: Path, *, seed: int | None = None, allow_pickle: bool = False,
               checkpoints: CheckpointCache | None = None, skeletons: SkeletonCache | None = None) -> MergePlan:
    """Check everything and resolve every tensor's job. Raises RecipeError / CheckpointError.

    ``checkpoints``: open the models through this cache (kept open after the plan is closed) instead of
    opening and closing them for this plan alone. ``skeletons`` (with ``checkpoints``): reuse what an
    earlier recipe of the same structure planned, so that only parameter values are resolved and checked.
    """
    if skeletons is not None and checkpoints is None:
        raise ValueError("skeletons need a CheckpointCache: a skeleton is only valid for the checkpoint objects "
                         "it was built from")
    method = get_method(recipe.method)
    mk = recipe.semantics == "mergekit"
    names = recipe.models()
    seed = recipe.seed if seed is None else seed
    ckpts: list[Checkpoint] = []
    try:
        for n in names:
            path = _resolve_path(n, root)
            ckpts.append(checkpoints.open(path, allow_pickle=allow_pickle) if checkpoints is not None
                         else Checkpoint(path, allow_pickle=allow_pickle))
        if skeletons is None:
            skeleton, fresh = build_skeleton(recipe, method, names, ckpts, mk, seed), True
        else:
            built = skeletons.built
            skeleton = skeletons.get((_structure(recipe), *ckpts),
                                     lambda: build_skeleton(recipe, method, names, ckpts, mk, seed))
            fresh = skeletons.built != built
        plan = _instantiate(skeleton, recipe, method, names, ckpts, mk, seed, warn=fresh)
    except BaseException:
        if checkpoints is None:
            for c in ckpts:
                c.close()
        raise
    plan.owns_checkpoints = checkpoints is None
    return plan


def _structure(recipe: Recipe) -> tuple:
    """Every recipe field a skeleton depends on: all of them but parameters and the seed (a field added to
    Recipe, Source or Slice belongs here unless it is such a value; tests pin the list of fields).

    Parameters (values, and which keys are present at which level) change what a tensor's parameters
    resolve to, never which tensors are merged from where; the seed is filled in per plan. Of depth_scaling
    only its presence counts (it needs a method with a base); its values are read from the plan's recipe.
    """
    def models(sources):
        return tuple((s.model, s.layer_range) for s in sources)

    return (recipe.method, recipe.semantics, recipe.base, recipe.dtype, recipe.tokenizer_source,
            recipe.depth_scaling is not None,
            None if recipe.sources is None else models(recipe.sources),
            None if recipe.slices is None else tuple(models(sl.sources) for sl in recipe.slices))


class SkeletonCache:
    """Plan skeletons of the last few recipe structures, for a process that plans recipe after recipe.

    Keyed by the recipe's structure and by the Checkpoint objects the plan opened through a
    CheckpointCache, which opens a checkpoint whose files changed on disk as a new object: a changed source
    is a new key, and its skeleton is built from the new headers. The key holds those objects, so their
    ids are not reused while it is cached. At most ``size`` skeletons are kept (least recently used first
    out). Used by one thread at a time.
    """

    def __init__(self, size: int = 4):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self._skeletons: OrderedDict[tuple, Skeleton] = OrderedDict()
        self.built = 0  # skeletons built (a structure seen for the first time, or its checkpoints changed)

    def get(self, key: tuple, build) -> Skeleton:
        skeleton = self._skeletons.get(key)
        if skeleton is not None:
            self._skeletons.move_to_end(key)
            return skeleton
        skeleton = build()  # a structure that fails its checks raises here and is not kept
        self.built += 1
        self._skeletons[key] = skeleton
        while len(self._skeletons) > self.size:
            self._skeletons.popitem(last=False)
        return skeleton


def _instantiate(skeleton: Skeleton, recipe, method, names, ckpts, mk, seed, *, warn: bool) -> MergePlan:
    """The plan of ``recipe`` on its structure's skeleton: every parameter resolved and checked, in the
    order planning visits the tensors, then the skeleton's problems raised. ``warn``: log the plan's notes
    (a skeleton's first plan; later plans of a search carry them without repeating them in the log)."""
    if recipe.tokenizer_source == "union":  # tokenizer files are not among those a Checkpoint watches
        _check_same_tokenizers(names, ckpts)
    scopes = [scope(recipe, loc) for loc in skeleton.scopes]
    top = recipe.parameters
    model_params, global_params = method.model_params, method.global_params
    model_keys, global_keys = tuple(model_params.model_fields), tuple(global_params.model_fields)
    seed = int(seed or 0)
    cache: dict = {}
    jobs: list[TensorJob] = []
    for step in skeleton.steps:
        sources, own = scopes[step.view]
        mps = []
        for pos, w, label in step.params:
            values = {}
            for key in model_keys:
                for level in (sources[pos], own, top):
                    if key in level:
                        v = resolve(level[key], w, substring_only=mk)
                        if v is not None:
                            values[key] = v
                            break
            mps.append(_validated(model_params, values, cache, label))
        gvalues = {}
        for key in global_keys:
            for level in (own, top):
                if key in level:
                    v = resolve(level[key], step.where, substring_only=mk)
                    if v is not None:
                        gvalues[key] = v
                        break
        gp = _validated(global_params, gvalues, cache, step.label)
        if step.out is not None:
            ctx = step.ctx if seed == skeleton.seed else replace(step.ctx, seed=seed)
            jobs.append(TensorJob(step.out, step.inputs, step.base, tuple(mps), gp, ctx, step.copy,
                                  step.vocab_rows))

    missing, shape_errors = skeleton.missing, skeleton.shape_errors
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from some models, e.g. " + "; ".join(missing[:5]))
    if shape_errors:
        raise CheckpointError(f"{len(shape_errors)} tensor(s) differ in shape between models, e.g. "
                              + "; ".join(shape_errors[:5]))
    notes: list[str] = []
    for name, sizes in skeleton.vocab_seen.items():
        msg = (f"vocabulary sizes differ for '{name}' ({sizes}): merging the {min(sizes.values())} rows common "
               f"to all models; rows beyond come from '{names[skeleton.donor]}'")
        notes.append(msg)
        if warn:
            log.warning(msg)
    origin = None if skeleton.layer_origin is None else list(skeleton.layer_origin)
    return MergePlan(recipe, method, list(names), list(ckpts), skeleton.donor, jobs, origin, skeleton.out_dtype, notes)


def _validated(model: type[MethodParams], values: dict, cache: dict, where: str) -> MethodParams:
    key = (model, tuple(sorted(values.items())))
    hit = cache.get(key)
    if hit is None:
        try:
            hit = model(**values)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise RecipeError(f"parameters out of range for {where}: {problems}") from None
        cache[key] = hit
    return hit


def _check_same_tokenizers(names, ckpts) -> None:
    blobs = {}
    for n, c in zip(names, ckpts, strict=True):
        f = c.path / "tokenizer.json"
        blobs[n] = f.read_bytes() if f.is_file() else None
    if len(set(blobs.values())) > 1:
        raise RecipeError("tokenizer_source: union with different tokenizers is not supported; "
                          "choose tokenizer_source: base or one model")
