"""Property tests for every registered merge method (shared/design/kernels.md, "Properties worth testing
for every method"); the selection helpers and random-drop statistics are in test_selection.py.

Kernels may modify ``xs`` in place, so every call gets clones. Inputs are small float32 tensors (1-D of
length 1..40, 2-D up to 8x8, sometimes 0-d); the degenerate cases the design lists (zeros, tiny values,
antipodal vectors, single elements, all-equal magnitudes) are drawn on purpose.
"""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from evomerge.kernels import DepthScaling, TensorContext, methods

METHODS = methods()
NAMES = sorted(METHODS)
WITH_BASE = [n for n in NAMES if METHODS[n].base == "required"]
RANDOMIZED = [n for n in NAMES if METHODS[n].randomized]
ORDERED = {"slerp"}  # slerp(t, a, c) is slerp(1 - t, c, a), tested on its own
UNORDERED = [n for n in NAMES if n not in ORDERED and (METHODS[n].max_models or 2) >= 2]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MAX_MODELS = 4

PROPS = settings(max_examples=30, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])

# ---------------------------------------------------------------- strategies

SHAPES = st.one_of(st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 8), st.integers(1, 8)))
SHAPES_0D = st.one_of(st.just(()), SHAPES)
FLOATS = st.floats(-100.0, 100.0, width=32)  # includes 0, +-0, subnormals, bounds
UNIT = st.floats(-1.0, 1.0, width=32)
# Values whose sums and dyadic-weighted sums are exact in float32: reordering models cannot round differently.
GRID = st.integers(-64, 64).map(lambda k: k / 16.0)
DYADIC_WEIGHT = st.integers(1, 8).map(lambda k: k / 4.0)


def tensor(draw, shape, elements=FLOATS) -> torch.Tensor:
    return torch.tensor(np.array(draw(hnp.arrays(np.float32, shape, elements=elements))), dtype=torch.float32)


def n_models(m, low=None):
    return st.integers(max(m.min_models, low or 1), min(m.max_models or MAX_MODELS, MAX_MODELS))


def _bounds(field):
    lo = hi = None
    open_lo = False
    for meta in field.metadata:
        if getattr(meta, "ge", None) is not None:
            lo = meta.ge
        if getattr(meta, "gt", None) is not None:
            lo, open_lo = meta.gt, True
        if getattr(meta, "le", None) is not None:
            hi = meta.le
    return lo, hi, open_lo


@st.composite
def valid_params(draw, model):
    """Any valid instance of a parameter model (ints capped to keep iterations cheap)."""
    values = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if ann is bool:
            values[name] = draw(st.booleans())
        elif typing.get_origin(ann) is typing.Literal:
            values[name] = draw(st.sampled_from(typing.get_args(ann)))
        elif ann is int:
            lo, hi, _ = _bounds(field)
            values[name] = draw(st.integers(int(lo), min(int(hi), int(lo) + 4)))
        else:
            lo, hi, open_lo = _bounds(field)
            lo32, hi32 = np.float32(lo), np.float32(hi)  # float32 bounds inside [lo, hi]
            lo32 = np.nextafter(lo32, np.float32(np.inf)) if float(lo32) < lo else lo32
            hi32 = np.nextafter(hi32, np.float32(-np.inf)) if float(hi32) > hi else hi32
            values[name] = draw(st.floats(float(lo32), float(hi32), exclude_min=open_lo, width=32))
    return model(**values)


KINDS = ("random", "zeros", "tiny", "equal_magnitude", "antipodal", "parallel", "identical", "single")


@st.composite
def scenario(draw, m, shapes=SHAPES_0D):
    """(base, xs) for method m, often degenerate: zeros, tiny, all-equal |t|, antipodal, parallel, ..."""
    kind = draw(st.sampled_from(KINDS))
    n = draw(n_models(m))
    shape = (1,) if kind == "single" else draw(shapes)
    base = torch.zeros(shape) if kind == "tiny" or draw(st.booleans()) else tensor(draw, shape)
    if kind in ("random", "single"):
        ds = [tensor(draw, shape) for _ in range(n)]
    elif kind == "zeros":
        ds = [torch.zeros(shape) for _ in range(n)]
    elif kind == "tiny":
        scale = draw(st.sampled_from([1e-30, 1e-38, 1e-45]))
        ds = [tensor(draw, shape, UNIT) * scale for _ in range(n)]
    elif kind == "equal_magnitude":
        c = draw(st.floats(2.0**-10, 10.0, width=32))
        ds = [tensor(draw, shape, st.sampled_from([-c, c])) for _ in range(n)]
    else:
        d = tensor(draw, shape)
        if kind == "antipodal":
            ds = [d if i % 2 == 0 else -d for i in range(n)]
        elif kind == "parallel":
            ds = [d * draw(st.floats(-3.0, 3.0, width=32)) for _ in range(n)]
        else:
            ds = [d.clone() for _ in range(n)]
    return base, [base + d for d in ds]


# ---------------------------------------------------------------- helpers


def ctx_for(n, seed=0, name="model.layers.1.mlp.up_proj.weight", ids=None) -> TensorContext:
    return TensorContext(name=name, layer=1, num_layers=4, seed=seed,
                         model_ids=tuple(ids) if ids is not None else tuple(f"m{i}" for i in range(n)))


def run(name, xs, base, mps, gp, ctx=None):
    """Call the kernel on clones of the sources (kernels own xs); base is passed as is."""
    m = METHODS[name]
    return m.fn([x.clone() for x in xs], base if m.base == "required" else None, list(mps), gp,
                ctx or ctx_for(len(xs)))


def defaults(name, n, model=None, **glob):
    m = METHODS[name]
    return [m.model_params(**(model[i] if model else {})) for i in range(n)], m.global_params(**glob)


def scale_of(*ts) -> float:
    return max((float(t.abs().max()) for t in ts if t is not None and t.numel()), default=0.0)


TINY = 1e-35  # absolute slack for subnormal float32 arithmetic (inputs go down to 1e-45)
KARCHER_ZERO = 1e-12  # karcher treats tensors of norm <= 1e-12 as zero


def assert_near(actual, expected, *inputs, rtol=1e-5, floor=TINY):
    """Equal up to float rounding relative to the largest input magnitude."""
    atol = rtol * scale_of(expected, *inputs) + floor
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def merge_atol(base, xs, mps, gp, rtol=1e-5) -> float:
    """Rounding slack of b + c * sum_i w_i t_i (c = lam, or lam / |sum w| when normalizing): relative to
    |b| and to the scaled task vectors t_i = x_i - b, never to the raw x_i, so cancelling x_i against
    b (which loses the task vector) does not pass as rounding."""
    ws = [getattr(mp, "weight", 1.0) for mp in mps]
    total = sum(ws)
    c = getattr(gp, "lam", 1.0)
    if getattr(gp, "normalize", False) and total != 0:
        c /= min(abs(total), 1.0)
    tv = sum(abs(w) * scale_of(x - base) for w, x in zip(ws, xs, strict=True))
    return rtol * (scale_of(base) + c * tv) + TINY


def has(name, field, scope="model_params") -> bool:
    return field in getattr(METHODS[name], scope).model_fields


# ---------------------------------------------------------------- identity properties


def unit_weight_config(name, n, draw):
    """Per-model and global overrides under which n identical sources must come back unchanged
    (weights that sum to 1 after normalization; sparsifiers that keep everything)."""
    w = [draw(st.floats(0.25, 4.0, width=32)) for _ in range(n)]
    weights = [{"weight": x} for x in w]
    full = {"density": 1.0}
    match name:
        case "linear" | "karcher" | "ties" | "dare_ties" | "sce":
            return weights, {}
        case "task_arithmetic":
            return weights, {"normalize": True}
        case "dare_linear":
            return [{**x, **full} for x in weights], {"normalize": True}
        case "della":
            return [{**x, **full, "epsilon": 0.0} for x in weights], {}
        case "della_linear":
            return [{**x, **full, "epsilon": 0.0} for x in weights], {"normalize": True}
        case "breadcrumbs" | "breadcrumbs_ties":
            return [{**x, **full, "gamma": 0.0} for x in weights], {"normalize": True}
        case "consensus":  # plain sum: weights must sum to 1 themselves; every nonzero entry kept
            return [{"weight": x / sum(w)} for x in w], {"mask_ratio": 0.0, "min_agree": 1}
        case "slerp":
            return [{}] * n, {"t": draw(st.floats(0.0, 1.0))}
        case _:  # model_stock, passthrough, tsv (1-D: mean; 2-D: run with one model only)
            return [{}] * n, {}


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=st.data())
def test_identical_sources_come_back_unchanged(name, data):
    """n copies of x (with a base different from x where the method has one) give x back."""
    m = METHODS[name]
    shape = data.draw(SHAPES_0D)
    n = data.draw(n_models(m))
    if name == "tsv" and len(shape) == 2:
        n = 1  # 2-D TSV sums per-model rank-k truncations: n copies give the rank-(r/n) truncation of x
    x = tensor(data.draw, shape)
    base = tensor(data.draw, shape) if m.base == "required" else None
    model, glob = unit_weight_config(name, n, data.draw)
    mps, gp = defaults(name, n, model, **glob)
    out = run(name, [x] * n, base, mps, gp)
    assert_near(out, x, base if base is not None else x, floor=KARCHER_ZERO if name == "karcher" else TINY)


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=st.data())
def test_identical_sources_equal_to_base_come_back_unchanged(name, data):
    """Sources == base == x give x (base-less methods: all sources x), default parameters."""
    m = METHODS[name]
    n = data.draw(n_models(m))
    x = tensor(data.draw, data.draw(SHAPES_0D))
    mps, gp = defaults(name, n)
    out = run(name, [x] * n, x.clone(), mps, gp)
    assert_near(out, x, x, floor=KARCHER_ZERO if name == "karcher" else TINY)


@pytest.mark.parametrize("name", WITH_BASE)
@PROPS
@given(data=st.data())
def test_zero_task_vectors_give_the_base(name, data):
    """All sources equal to the base give the base (up to rounding of |base|), whatever the (valid)
    parameters: in particular normalizing by a near-zero sum of weights must not amplify anything."""
    m = METHODS[name]
    n = data.draw(n_models(m))
    base = tensor(data.draw, data.draw(SHAPES_0D))
    mps = [data.draw(valid_params(m.model_params)) for _ in range(n)]
    gp = data.draw(valid_params(m.global_params))
    out = run(name, [base] * n, base, mps, gp, ctx_for(n, seed=data.draw(st.integers(0, 2**31))))
    torch.testing.assert_close(out, base, rtol=0, atol=merge_atol(base, [base] * n, mps, gp))


NORMALIZING = [n for n in WITH_BASE if has(n, "weight") and has(n, "normalize", "global_params")]


@pytest.mark.parametrize("lam", [1.0, 0.5])
@pytest.mark.parametrize("name", NORMALIZING)
def test_zero_task_vectors_give_the_base_when_weights_nearly_cancel(name, lam):
    """Normalizing by sum w = 1e-4 amplifies the task vectors 10^4 times; zero ones must stay zero
    (computing b (1 - c W) + c sum w_i x_i instead would amplify the rounding of |x| ~ |b|)."""
    base = torch.tensor([1.2345, -3.3, 50.0, 0.02, -7.77])
    mps, gp = defaults(name, 2, [{"weight": 1.0}, {"weight": -0.9999}], normalize=True, lam=lam)
    out = run(name, [base, base], base, mps, gp)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=TINY)


# ---------------------------------------------------------------- order of models


def order_safe_params(name, n, draw):
    """Random per-model parameters that keep every sum exact on GRID inputs (dyadic weights, keep
    probabilities with dyadic reciprocals), so reordering can only change float rounding, not masks."""
    m = METHODS[name]
    out = []
    for _ in range(n):
        kw = {}
        if has(name, "weight"):
            kw["weight"] = draw(DYADIC_WEIGHT)
        if has(name, "density"):
            kw["density"] = draw(st.sampled_from([0.25, 0.5, 1.0]) if m.randomized else st.floats(0.0, 0.9))
        if has(name, "epsilon"):
            kw["epsilon"] = 0.0
        out.append(m.model_params(**kw))
    return out


def tsv_well_conditioned(ts, floor=0.05) -> bool:
    """Whether TSV's concatenated top-k singular vectors have a unique polar factor. Zero, identical or
    parallel task vectors make the concatenation rank-deficient; its polar factor then depends on the
    arbitrary null-space basis LAPACK returns, so the result is not a function of the set of models."""
    k = max(1, min(ts[0].shape) // len(ts))
    svds = [torch.linalg.svd(t, full_matrices=False) for t in ts]
    us = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    vs = torch.cat([vh[:k].T for _, _, vh in svds], dim=1)
    return all(float(torch.linalg.svdvals(m).min()) > floor for m in (us, vs))


@pytest.mark.parametrize("name", UNORDERED)
@PROPS
@given(data=st.data())
def test_order_of_models_does_not_matter(name, data):
    """Permuting the sources (with their parameters and model ids) changes nothing beyond rounding."""
    m = METHODS[name]
    n = data.draw(n_models(m, low=2))
    shape = data.draw(SHAPES)
    base = tensor(data.draw, shape, GRID)
    xs = [tensor(data.draw, shape, GRID) for _ in range(n)]
    mps = order_safe_params(name, n, data.draw)
    gp = m.global_params(**({"normalize": data.draw(st.booleans())} if has(name, "normalize", "global_params")
                            else {}))
    if name == "karcher":  # the Karcher mean is only defined when the weighted mean direction is
        units = [x.reshape(-1) / x.norm() for x in xs if x.norm() > 0]
        assume(units and float(sum(units).norm()) > 0.25 * len(units))
    if name == "tsv" and len(shape) == 2:
        assume(tsv_well_conditioned([(x - base) * mp.weight for x, mp in zip(xs, mps, strict=True)]))
    perm = data.draw(st.permutations(range(n)))
    assume(list(perm) != list(range(n)))
    ctx = ctx_for(n, seed=data.draw(st.integers(0, 1000)))
    out = run(name, xs, base, mps, gp, ctx)
    ctx_p = ctx_for(n, seed=ctx.seed, ids=[ctx.model_ids[i] for i in perm])
    out_p = run(name, [xs[i] for i in perm], base, [mps[i] for i in perm], gp, ctx_p)
    assert_near(out_p, out, base, *xs, rtol=1e-4 if name in ("karcher", "tsv") else 1e-5)


@PROPS
@given(data=st.data())
def test_slerp_is_ordered_but_symmetric_in_t(data):
    """slerp(t; a, c) == slerp(1 - t; c, a); t = 0 gives a, t = 1 gives c."""
    _, (a, c) = data.draw(scenario(METHODS["slerp"], SHAPES))
    t = data.draw(st.floats(0.0, 1.0))
    fwd = run("slerp", [a, c], None, *defaults("slerp", 2, t=t))
    back = run("slerp", [c, a], None, *defaults("slerp", 2, t=1.0 - t))
    assert_near(back, fwd, a, c)
    assert_near(run("slerp", [a, c], None, *defaults("slerp", 2, t=0.0)), a, a, c)
    assert_near(run("slerp", [a, c], None, *defaults("slerp", 2, t=1.0)), c, a, c)


# ---------------------------------------------------------------- DARE / DELLA at density 1

PARENTS = [("dare_linear", "task_arithmetic"), ("dare_ties", "ties"), ("della", "ties"),
           ("della_linear", "task_arithmetic")]


@pytest.mark.parametrize(("name", "parent"), PARENTS)
@PROPS
@given(data=st.data())
def test_random_drop_at_density_one_is_its_parent(name, parent, data):
    """DARE at density 1 (DELLA also at epsilon 0) is its deterministic parent, up to rounding."""
    m, p = METHODS[name], METHODS[parent]
    base, xs = data.draw(scenario(m, SHAPES))
    n = len(xs)
    weights = [data.draw(st.floats(-10.0, 10.0, width=32)) for _ in range(n)]
    lam = data.draw(st.floats(0.0, 10.0, width=32))
    normalize = data.draw(st.booleans())
    extra = {"epsilon": 0.0} if has(name, "epsilon") else {}
    mps = [m.model_params(weight=w, density=1.0, **extra) for w in weights]
    gp = m.global_params(lam=lam, normalize=normalize, rescale=data.draw(st.sampled_from(["inverse", "l1", "none"])))
    pmps = [p.model_params(weight=w) for w in weights]
    pgp = p.global_params(lam=lam, normalize=normalize)
    ctx = ctx_for(n, seed=data.draw(st.integers(0, 2**31)))
    out, expected = run(name, xs, base, mps, gp, ctx), run(parent, xs, base, pmps, pgp, ctx)
    torch.testing.assert_close(out, expected, rtol=0, atol=merge_atol(base, xs, mps, gp))


# ---------------------------------------------------------------- shape, dtype, device, finiteness


def check_output(out, base, xs, device):
    ref = xs[0]
    assert isinstance(out, torch.Tensor)
    assert out.shape == ref.shape
    assert out.dtype == torch.float32
    assert out.device == ref.device and out.device.type == torch.device(device).type
    assert bool(torch.isfinite(out).all()), out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=st.data())
def test_default_params_keep_shape_dtype_device_and_stay_finite(name, device, data):
    m = METHODS[name]
    base, xs = data.draw(scenario(m))
    base, xs = base.to(device), [x.to(device) for x in xs]
    keep = base.clone()
    mps, gp = defaults(name, len(xs))
    out = run(name, xs, base, mps, gp)
    check_output(out, base, xs, device)
    assert torch.equal(base, keep), "the kernel modified the base in place"
    assert out.data_ptr() != base.data_ptr() or base.numel() == 0, "the result aliases the base"


@pytest.mark.parametrize("name", NAMES)
@settings(PROPS, max_examples=50)
@given(data=st.data())
def test_any_valid_params_stay_finite(name, data):
    """Any parameters the models accept, on degenerate inputs, give a finite tensor of the right shape."""
    m = METHODS[name]
    base, xs = data.draw(scenario(m))
    mps = [data.draw(valid_params(m.model_params)) for _ in xs]
    gp = data.draw(valid_params(m.global_params))
    out = run(name, xs, base, mps, gp, ctx_for(len(xs), seed=data.draw(st.integers(0, 2**31))))
    check_output(out, base, xs, "cpu")


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=st.data())
def test_fixed_seed_gives_identical_bits(name, device, data):
    m = METHODS[name]
    base, xs = data.draw(scenario(m, SHAPES))
    base, xs = base.to(device), [x.to(device) for x in xs]
    mps = [data.draw(valid_params(m.model_params)) for _ in xs]
    gp = data.draw(valid_params(m.global_params))
    seed = data.draw(st.integers(0, 2**63 - 1))
    first = run(name, xs, base, mps, gp, ctx_for(len(xs), seed=seed))
    second = run(name, xs, base, mps, gp, ctx_for(len(xs), seed=seed))
    assert torch.equal(first, second)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", RANDOMIZED)
@PROPS
@given(seeds=st.lists(st.integers(0, 2**63 - 1), min_size=2, max_size=2, unique=True),
       density=st.floats(0.2, 0.8), n=st.integers(1, 3))
def test_another_seed_model_or_tensor_draws_another_mask(name, device, seeds, density, n):
    """With 64 nonzero entries at density ~0.5 two independent masks coincide with chance < 2^-40."""
    base = torch.zeros(8, 8, device=device)
    xs = [torch.arange(1.0, 65.0, device=device).reshape(8, 8) * (i + 1) for i in range(n)]
    mps, gp = defaults(name, n, [{"density": density}] * n)
    out = [run(name, xs, base, mps, gp, ctx_for(n, seed=s)) for s in seeds]
    assert not torch.equal(out[0], out[1])
    renamed = run(name, xs, base, mps, gp, ctx_for(n, seed=seeds[0], name="model.layers.2.mlp.up_proj.weight"))
    assert not torch.equal(out[0], renamed)
    other_ids = run(name, xs, base, mps, gp, ctx_for(n, seed=seeds[0], ids=[f"other{i}" for i in range(n)]))
    assert not torch.equal(out[0], other_ids)


# ---------------------------------------------------------------- depth scaling (LiNeS)


@PROPS
@given(data=st.data())
def test_depth_scaling_scales_the_task_vector(data):
    shape = data.draw(SHAPES)
    base, merged = tensor(data.draw, shape), tensor(data.draw, shape)
    ds = data.draw(valid_params(DepthScaling))
    depth = data.draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    s = ds.scale(depth)
    assert s == (ds.alpha if depth is None else ds.alpha + ds.beta * depth)
    out = ds.apply(merged.clone(), base, depth)
    assert out.shape == merged.shape and out.dtype == torch.float32
    assert_near(out, base + s * (merged - base), base, merged, rtol=1e-4 * max(1.0, abs(s)))
    assert torch.equal(DepthScaling().apply(merged.clone(), base, depth), merged)
