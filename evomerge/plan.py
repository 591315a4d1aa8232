"""Turn a recipe into a merge plan: one job per output tensor, every check done before any work.

Planning opens the checkpoints (headers only), checks architectures, tensor names and shapes, resolves
every parameter for every tensor and validates it against the method's bounds. Problems are reported
here, before a byte of output is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from pydantic import ValidationError

from evomerge.checkpoint import naming
from evomerge.checkpoint.naming import is_vocab_tensor
from evomerge.checkpoint.reader import Checkpoint, CheckpointCache
from evomerge.checkpoint.writer import TensorSpec
from evomerge.errors import CheckpointError, RecipeError
from evomerge.kernels.params import MethodParams
from evomerge.kernels.registry import MergeMethod, TensorContext, get_method
from evomerge.recipe.schema import Recipe, Source
from evomerge.recipe.values import Where, resolve

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TIED = ("model.embed_tokens.weight", "transformer.wte.weight")
# Pure functions of a tensor name, called for every tensor of every plan: an evaluator plans the same
# names for every candidate.
parse = lru_cache(maxsize=1 << 16)(naming.parse)
with_layer = lru_cache(maxsize=1 << 16)(naming.with_layer)


@dataclass(frozen=True)
class InputRef:
    model: int  # index into MergePlan.checkpoints
    name: str


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


@dataclass(frozen=True)
class _SliceView:
    """One slice normalized: merge sources, the base's entry, and the range of layers."""

    sources: list[Source]
    base: Source | None
    parameters: dict
    length: int  # layers in the slice (0 for whole-model syntax before layer counts are known)


def _resolve_path(model: str, root: Path) -> Path:
    p = Path(model).expanduser()
    return p if p.is_absolute() else (root / p)


def _input_name(ckpt: Checkpoint, name: str) -> str | None:
    if name in ckpt:
        return name
    if name == "lm_head.weight" and ckpt.config.get("tie_word_embeddings", True):
        return next((t for t in _TIED if t in ckpt), None)
    return None


def build_plan(recipe: Recipe, root: Path, *, seed: int | None = None, allow_pickle: bool = False,
               checkpoints: CheckpointCache | None = None) -> MergePlan:
    """Check everything and resolve every tensor's job. Raises RecipeError / CheckpointError.

    ``checkpoints``: open the models through this cache (kept open after the plan is closed) instead of
    opening and closing them for this plan alone.
    """
    method = get_method(recipe.method)
    mk = recipe.semantics == "mergekit"
    names = recipe.models()
    ckpts: list[Checkpoint] = []
    try:
        for n in names:
            path = _resolve_path(n, root)
            ckpts.append(checkpoints.open(path, allow_pickle=allow_pickle) if checkpoints is not None
                         else Checkpoint(path, allow_pickle=allow_pickle))
        plan = _plan(recipe, method, names, ckpts, mk, recipe.seed if seed is None else seed)
    except BaseException:
        if checkpoints is None:
            for c in ckpts:
                c.close()
        raise
    plan.owns_checkpoints = checkpoints is None
    return plan


def _plan(recipe, method, names, ckpts, mk, seed) -> MergePlan:
    index = {n: i for i, n in enumerate(names)}
    archs = {n: (c.architecture, c.config.get("model_type")) for n, c in zip(names, ckpts, strict=True)}
    if len(set(archs.values())) > 1:
        listing = "; ".join(f"{n}: {a[0]} ({a[1]})" for n, a in archs.items())
        raise CheckpointError(f"models have different architectures, which cannot be merged: {listing}")
    notes: list[str] = []

    # ---- slices
    views: list[_SliceView] = []
    if recipe.sources is not None:
        layers = {n: ckpts[index[n]].num_layers for n in names}
        if len(set(layers.values())) > 1:
            raise CheckpointError(f"models have different layer counts: {layers}; use slices to pick layers")
        base = Source(model=recipe.base) if recipe.base else None
        views.append(_SliceView(list(recipe.sources), base, {}, next(iter(layers.values()))))
    else:
        for i, sl in enumerate(recipe.slices):
            merge_sources = [s for s in sl.sources if s.model != recipe.base] if method.base == "required" \
                else list(sl.sources)
            # A method without a base never reads it: a base listed in a slice is only a source there.
            base_src = next((s for s in sl.sources if s.model == recipe.base), None) \
                if method.base == "required" else None
            if method.base == "required" and base_src is None:
                raise RecipeError(f"slices[{i}]: method '{method.name}' needs the base model "
                                  f"'{recipe.base}' among the slice's sources (with a layer_range)")
            if not merge_sources:
                merge_sources = [base_src]
            for s in sl.sources:
                n_layers = ckpts[index[s.model]].num_layers
                if s.layer_range[1] > n_layers:
                    raise RecipeError(f"slices[{i}]: layer_range {list(s.layer_range)} of '{s.model}' "
                                      f"exceeds its {n_layers} layers")
            views.append(_SliceView(merge_sources, base_src, dict(sl.parameters),
                                    sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]))
    for v in views:
        method.check_models(len(v.sources), v.base is not None)
    if recipe.depth_scaling is not None and method.base != "required":
        raise RecipeError(f"depth_scaling scales task vectors and needs a method with a base; '{method.name}' has none")

    # ---- donor (config and tokenizer)
    tok = recipe.tokenizer_source
    if tok in (None, "base", "union"):
        if tok == "base" and not recipe.base:
            raise RecipeError("tokenizer_source: base, but the recipe has no base")
        if tok == "union":
            _check_same_tokenizers(names, ckpts)
        donor_name = recipe.base or views[0].sources[0].model
    else:
        if tok not in index:
            raise RecipeError(f"tokenizer_source '{tok}' is not one of the recipe's models: {names}")
        donor_name = tok
    donor = index[donor_name]

    out_dtype = DTYPES[recipe.dtype] if recipe.dtype else _donor_dtype(ckpts[donor])
    total_layers = sum(v.length for v in views)
    whole = recipe.sources is not None
    cache: dict = {}
    jobs: list[TensorJob] = []
    missing: list[str] = []
    shape_errors: list[str] = []
    vocab_seen: dict[str, dict[str, int]] = {}

    def make_job(out_name, in_names: dict[str, str], view: _SliceView, offset, out_layer):
        # in_names: model -> input tensor name for this output tensor
        refs, mps = [], []
        info = parse(out_name)
        n = view.length
        if offset is None:
            t = 0.0 if (mk or info.component == "embedding") else 1.0
        else:
            t = offset / (n - 1) if n > 1 else (1.0 if mk else 0.0)

        def where(name):
            return Where(name, info.component, t, offset, max(1, n))

        for src in view.sources:
            in_name = _input_name(ckpts[index[src.model]], in_names[src.model])
            if in_name is None:
                missing.append(f"'{in_names[src.model]}' in {src.model}")
                continue
            refs.append(InputRef(index[src.model], in_name))
            values = {}
            for key in method.model_params.model_fields:
                w = where(in_name if mk else out_name)
                for level in (src.parameters, view.parameters, recipe.parameters):
                    if key in level:
                        v = resolve(level[key], w, substring_only=mk)
                        if v is not None:
                            values[key] = v
                            break
            mps.append(_validated(method.model_params, values, cache, f"model '{src.model}', tensor '{out_name}'"))
        base_ref = None
        if view.base is not None:
            b_name = _input_name(ckpts[index[view.base.model]], in_names[view.base.model])
            if b_name is None:
                missing.append(f"'{in_names[view.base.model]}' in {view.base.model}")
            else:
                base_ref = InputRef(index[view.base.model], b_name)
        gvalues = {}
        for key in method.global_params.model_fields:
            for level in (view.parameters, recipe.parameters):
                if key in level:
                    v = resolve(level[key], where(out_name), substring_only=mk)
                    if v is not None:
                        gvalues[key] = v
                        break
        gp = _validated(method.global_params, gvalues, cache, f"tensor '{out_name}'")
        if len(refs) != len(view.sources) or (view.base is not None and base_ref is None):
            return
        all_refs = refs + ([base_ref] if base_ref else [])
        metas = [ckpts[r.model].meta(r.name) for r in all_refs]
        shapes = {tuple(m.shape) for m in metas}
        vocab_rows = None
        out_shape = metas[0].shape
        if len(shapes) > 1:
            same_tail = len({s[1:] for s in shapes}) == 1
            if is_vocab_tensor(out_name) and same_tail:
                vocab_rows = min(s[0] for s in shapes)
                donor_ref = next((r for r in all_refs if r.model == donor), None)
                out_shape = ckpts[donor_ref.model].meta(donor_ref.name).shape if donor_ref else metas[0].shape
                vocab_seen[out_name] = {names[r.model]: m.shape[0] for r, m in zip(all_refs, metas, strict=True)}
            else:
                detail = ", ".join(f"{names[r.model]} {list(m.shape)}" for r, m in zip(all_refs, metas, strict=True))
                shape_errors.append(f"'{out_name}': {detail}")
                return
        is_float = metas[0].dtype.is_floating_point
        spec = TensorSpec(out_name, out_dtype if is_float else metas[0].dtype, tuple(out_shape))
        ctx = TensorContext(out_name, out_layer, total_layers if not whole else view.length, info.component,
                            int(seed or 0), tuple(names[r.model] for r in refs))
        jobs.append(TensorJob(spec, tuple(refs), base_ref, tuple(mps), gp, ctx, copy=not is_float,
                              vocab_rows=vocab_rows))

    donor_ck = ckpts[donor]
    pre = [n for n in donor_ck.names if parse(n).layer is None and parse(n).component == "embedding"]
    post = [n for n in donor_ck.names if parse(n).layer is None and parse(n).component != "embedding"]
    all_models = {s.model for v in views for s in v.sources} | ({recipe.base} if recipe.base else set())
    # Tensors outside the layer stack follow the first / last slice (as in mergekit), except in a one-model
    # layer recipe (passthrough) naming a base or a tokenizer model: there they are the donor's own.
    first, last = views[0], views[-1]
    if not whole and not mk and method.max_models == 1 and (recipe.base or tok not in (None, "union")):
        first = last = _SliceView([Source(model=donor_name)], None, {}, views[0].length)
    for name in pre:
        make_job(name, dict.fromkeys(all_models, name), first, None, None)
    layer_origin: list[int] = []
    out_layer = 0
    for v in views:
        first = v.sources[0]
        start0 = first.layer_range[0] if first.layer_range else 0
        template = ckpts[index[first.model]]
        by_layer: dict[int, list[str]] = {}
        for n in template.names:
            lay = parse(n).layer
            if lay is not None:
                by_layer.setdefault(lay, []).append(n)
        for offset in range(v.length):
            for tname in by_layer.get(start0 + offset, []):
                in_names = {}
                for s in v.sources + ([v.base] if v.base else []):
                    s_start = s.layer_range[0] if s.layer_range else 0
                    in_names[s.model] = with_layer(tname, s_start + offset)
                make_job(with_layer(tname, out_layer), in_names, v, offset, out_layer)
            layer_origin.append(start0 + offset)
            out_layer += 1
    for name in post:
        make_job(name, dict.fromkeys(all_models, name), last, None, None)

    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from some models, e.g. " + "; ".join(missing[:5]))
    if shape_errors:
        raise CheckpointError(f"{len(shape_errors)} tensor(s) differ in shape between models, e.g. "
                              + "; ".join(shape_errors[:5]))
    for name, sizes in vocab_seen.items():
        msg = (f"vocabulary sizes differ for '{name}' ({sizes}): merging the {min(sizes.values())} rows common "
               f"to all models; rows beyond come from '{names[donor]}'")
        notes.append(msg)
        log.warning(msg)
    origin = None if whole else layer_origin
    return MergePlan(recipe, method, names, ckpts, donor, jobs, origin, out_dtype, notes)


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


def _donor_dtype(ck: Checkpoint) -> torch.dtype:
    name = ck.config.get("torch_dtype") or ck.config.get("dtype")
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    for n in ck.names:
        dt = ck.meta(n).dtype
        if dt.is_floating_point:
            return dt if dt in DTYPES.values() else torch.float32
    return torch.float32


def _check_same_tokenizers(names, ckpts) -> None:
    blobs = {}
    for n, c in zip(names, ckpts, strict=True):
        f = c.path / "tokenizer.json"
        blobs[n] = f.read_bytes() if f.is_file() else None
    if len(set(blobs.values())) > 1:
        raise RecipeError("tokenizer_source: union with different tokenizers is not supported; "
                          "choose tokenizer_source: base or one model")
