"""The skeleton of a merge plan: what it takes from a recipe's structure and its checkpoints' headers.

For every output tensor: its inputs (with tied embeddings found), the base's input, the output spec, vocabulary
rows when sizes differ, its TensorContext, and where each of its parameters is resolved in a recipe. Every
check of the structure against the headers runs here (architectures, layer counts and ranges, the base of
a slice, depth scaling, the donor); missing tensors and shape differences are collected for the plan to
raise once a recipe's parameters are checked. Parameter values are never read: ``evomerge.plan`` resolves
them per recipe on the skeleton.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from types import MappingProxyType

import torch

from evomerge.checkpoint import naming
from evomerge.checkpoint.naming import is_vocab_tensor
from evomerge.checkpoint.reader import Checkpoint
from evomerge.checkpoint.writer import TensorSpec
from evomerge.errors import CheckpointError, RecipeError
from evomerge.kernels.registry import TensorContext
from evomerge.recipe.schema import Recipe, Source
from evomerge.recipe.values import Where

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TIED = ("model.embed_tokens.weight", "transformer.wte.weight")
# Pure functions of a tensor name, called for every tensor of every skeleton.
parse = lru_cache(maxsize=1 << 16)(naming.parse)
with_layer = lru_cache(maxsize=1 << 16)(naming.with_layer)


@dataclass(frozen=True)
class InputRef:
    model: int  # index into MergePlan.checkpoints
    name: str


@dataclass(frozen=True)
class SliceView:
    """One slice normalized: merge sources, the base's entry, and the range of layers."""

    sources: list[Source]
    base: Source | None
    parameters: dict
    length: int  # layers in the slice (0 for whole-model syntax before layer counts are known)


def _input_name(ckpt: Checkpoint, name: str) -> str | None:
    if name in ckpt:
        return name
    if name == "lm_head.weight" and ckpt.config.get("tie_word_embeddings", True):
        return next((t for t in _TIED if t in ckpt), None)
    return None


@dataclass(frozen=True)
class Step:
    """One output tensor as planning visits it, with everything but its parameter values.

    ``params``: per source that has the tensor, its position among the view's sources, where its model
    parameters resolve and how an error names it. ``out`` is None where an input is missing or differs in
    shape: the tensor's parameters are checked all the same, and the problem reported after every tensor's.
    """

    view: int  # index into Skeleton.scopes
    params: tuple[tuple[int, Where, str], ...]
    where: Where  # where the global parameters resolve
    label: str
    out: TensorSpec | None = None
    inputs: tuple[InputRef, ...] = ()
    base: InputRef | None = None
    ctx: TensorContext | None = None
    copy: bool = False
    vocab_rows: int | None = None


@dataclass(frozen=True)
class Skeleton:
    """Everything a plan takes from a recipe's structure and its checkpoints' headers, values aside.

    ``scopes``: per view, where its sources' and its own parameters are found in a recipe (see ``scope``).
    ``missing``, ``shape_errors``: problems raised once a plan's parameters are checked, as planning
    reports them after every parameter problem.
    """

    scopes: tuple[tuple, ...]
    steps: tuple[Step, ...]
    donor: int
    layer_origin: list[int] | None
    out_dtype: torch.dtype
    seed: int  # the seed in every step's TensorContext
    missing: tuple[str, ...]
    shape_errors: tuple[str, ...]
    vocab_seen: dict[str, dict[str, int]]


_NO_PARAMETERS = MappingProxyType({})


def scope(recipe: Recipe, locator: tuple) -> tuple[tuple, Mapping]:
    """A view's parameter levels in ``recipe``: its merge sources' parameters and the view's own."""
    if locator[0] == "sources":
        return tuple(s.parameters for s in recipe.sources), _NO_PARAMETERS
    if locator[0] == "slice":
        sl = recipe.slices[locator[1]]
        return tuple(sl.sources[j].parameters for j in locator[2]), sl.parameters
    return (_NO_PARAMETERS,), _NO_PARAMETERS  # "donor": the donor alone, with the recipe's parameters only


def build_skeleton(recipe, method, names, ckpts, mk, seed) -> Skeleton:
    index = {n: i for i, n in enumerate(names)}
    archs = {n: (c.architecture, c.config.get("model_type")) for n, c in zip(names, ckpts, strict=True)}
    if len(set(archs.values())) > 1:
        listing = "; ".join(f"{n}: {a[0]} ({a[1]})" for n, a in archs.items())
        raise CheckpointError(f"models have different architectures, which cannot be merged: {listing}")

    # ---- slices
    views: list[SliceView] = []
    scopes: list[tuple] = []
    if recipe.sources is not None:
        layers = {n: ckpts[index[n]].num_layers for n in names}
        if len(set(layers.values())) > 1:
            raise CheckpointError(f"models have different layer counts: {layers}; use slices to pick layers")
        base = Source(model=recipe.base) if recipe.base else None
        views.append(SliceView(list(recipe.sources), base, {}, next(iter(layers.values()))))
        scopes.append(("sources",))
    else:
        for i, sl in enumerate(recipe.slices):
            merge = [j for j, s in enumerate(sl.sources) if s.model != recipe.base] if method.base == "required" \
                else list(range(len(sl.sources)))
            # A method without a base never reads it: a base listed in a slice is only a source there.
            base_at = next((j for j, s in enumerate(sl.sources) if s.model == recipe.base), None) \
                if method.base == "required" else None
            if method.base == "required" and base_at is None:
                raise RecipeError(f"slices[{i}]: method '{method.name}' needs the base model "
                                  f"'{recipe.base}' among the slice's sources (with a layer_range)")
            if not merge:
                merge = [base_at]
            for s in sl.sources:
                n_layers = ckpts[index[s.model]].num_layers
                if s.layer_range[1] > n_layers:
                    raise RecipeError(f"slices[{i}]: layer_range {list(s.layer_range)} of '{s.model}' "
                                      f"exceeds its {n_layers} layers")
            views.append(SliceView([sl.sources[j] for j in merge],
                                    sl.sources[base_at] if base_at is not None else None, dict(sl.parameters),
                                    sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]))
            scopes.append(("slice", i, tuple(merge)))
    for v in views:
        method.check_models(len(v.sources), v.base is not None)
    if recipe.depth_scaling is not None and method.base != "required":
        raise RecipeError(f"depth_scaling scales task vectors and needs a method with a base; '{method.name}' has none")

    # ---- donor (config and tokenizer); tokenizer_source: union is checked per plan (_instantiate)
    tok = recipe.tokenizer_source
    if tok in (None, "base", "union"):
        if tok == "base" and not recipe.base:
            raise RecipeError("tokenizer_source: base, but the recipe has no base")
        donor_name = recipe.base or views[0].sources[0].model
    else:
        if tok not in index:
            raise RecipeError(f"tokenizer_source '{tok}' is not one of the recipe's models: {names}")
        donor_name = tok
    donor = index[donor_name]

    out_dtype = DTYPES[recipe.dtype] if recipe.dtype else _donor_dtype(ckpts[donor])
    total_layers = sum(v.length for v in views)
    whole = recipe.sources is not None
    seed = int(seed or 0)
    steps: list[Step] = []
    missing: list[str] = []
    shape_errors: list[str] = []
    vocab_seen: dict[str, dict[str, int]] = {}

    def visit(out_name, in_names: dict[str, str], view_no: int, offset, out_layer):
        # in_names: model -> input tensor name for this output tensor
        view = views[view_no] if view_no < len(views) else donor_view
        refs, params = [], []
        info = parse(out_name)
        n = view.length
        if offset is None:
            t = 0.0 if (mk or info.component == "embedding") else 1.0
        else:
            t = offset / (n - 1) if n > 1 else (1.0 if mk else 0.0)
        where = Where(out_name, info.component, t, offset, max(1, n))
        for pos, src in enumerate(view.sources):
            in_name = _input_name(ckpts[index[src.model]], in_names[src.model])
            if in_name is None:
                missing.append(f"'{in_names[src.model]}' in {src.model}")
                continue
            refs.append(InputRef(index[src.model], in_name))
            w = Where(in_name, info.component, t, offset, max(1, n)) if mk else where
            params.append((pos, w, f"model '{src.model}', tensor '{out_name}'"))
        step = Step(view_no, tuple(params), where, f"tensor '{out_name}'")
        base_ref = None
        if view.base is not None:
            b_name = _input_name(ckpts[index[view.base.model]], in_names[view.base.model])
            if b_name is None:
                missing.append(f"'{in_names[view.base.model]}' in {view.base.model}")
            else:
                base_ref = InputRef(index[view.base.model], b_name)
        steps.append(step)
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
                            seed, tuple(names[r.model] for r in refs))
        steps[-1] = replace(step, out=spec, inputs=tuple(refs), base=base_ref, ctx=ctx, copy=not is_float,
                            vocab_rows=vocab_rows)

    donor_ck = ckpts[donor]
    pre = [n for n in donor_ck.names if parse(n).layer is None and parse(n).component == "embedding"]
    post = [n for n in donor_ck.names if parse(n).layer is None and parse(n).component != "embedding"]
    all_models = {s.model for v in views for s in v.sources} | ({recipe.base} if recipe.base else set())
    # Tensors outside the layer stack follow the first / last slice (as in mergekit), except in a one-model
    # layer recipe (passthrough) naming a base or a tokenizer model: there they are the donor's own.
    first, last = 0, len(views) - 1
    donor_view = SliceView([Source(model=donor_name)], None, {}, views[0].length)
    if not whole and not mk and method.max_models == 1 and (recipe.base or tok not in (None, "union")):
        first = last = len(views)
        scopes.append(("donor",))
    for name in pre:
        visit(name, dict.fromkeys(all_models, name), first, None, None)
    layer_origin: list[int] = []
    out_layer = 0
    for view_no, v in enumerate(views):
        lead = v.sources[0]
        start0 = lead.layer_range[0] if lead.layer_range else 0
        template = ckpts[index[lead.model]]
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
                visit(with_layer(tname, out_layer), in_names, view_no, offset, out_layer)
            layer_origin.append(start0 + offset)
            out_layer += 1
    for name in post:
        visit(name, dict.fromkeys(all_models, name), last, None, None)
    return Skeleton(tuple(scopes), tuple(steps), donor, None if whole else layer_origin, out_dtype, seed,
                     tuple(missing), tuple(shape_errors), vocab_seen)


def _donor_dtype(ck: Checkpoint) -> torch.dtype:
    name = ck.config.get("torch_dtype") or ck.config.get("dtype")
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    for n in ck.names:
        dt = ck.meta(n).dtype
        if dt.is_floating_point:
            return dt if dt in DTYPES.values() else torch.float32
    return torch.float32
