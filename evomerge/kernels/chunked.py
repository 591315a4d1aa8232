"""Task-vector pipelines over chunks of a large tensor, with the same result as the whole-tensor path.

Selections that need the whole tensor (TIES trimming, breadcrumbs bands) are settled first
(kernels/settle.py: sampled brackets and a counting pass, exact histogram passes, or kept magnitude
histograms); then every chunk runs sparsify, consensus and the combination entrywise, in cache. Inputs
stay in their stored dtype; float32 exists one chunk at a time, so memory stays near the stored inputs plus
the output, and each value moves through main memory a few times instead of once per operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from evomerge.kernels import fused, native, settle
from evomerge.kernels.bracket import delta_magnitude, in_eager
from evomerge.kernels.registry import TensorContext
from evomerge.kernels.select import BLOCK, StreamTopK, exact_count, stream_keys, uniform
from evomerge.kernels.taskvector import (
    Consensus,
    Magnitude,
    MagnitudeBand,
    RandomDrop,
    SignElection,
    Sparsifier,
    TaskVectorPipeline,
    band_counts,
    drop_and_rescale,
)


def supports(fn, mps, gp) -> bool:
    """Whether ``fn`` (a registered kernel) with these parameters can run chunk by chunk."""
    if not isinstance(fn, TaskVectorPipeline) or fn.energy_weights:
        return False
    kind = type(fn.sparsifier)
    if kind is RandomDrop:
        return gp.rescale != "l1"  # restoring a tensor's L1 norm needs its sums first
    return kind in (Sparsifier, Magnitude, MagnitudeBand)


def _selections(pipe: TaskVectorPipeline, mp, n: int, device) -> list[StreamTopK]:
    if mp.density >= 1.0:
        return []
    if isinstance(pipe.sparsifier, Magnitude):
        return [StreamTopK(exact_count(mp.density, n), n, device)]
    if isinstance(pipe.sparsifier, MagnitudeBand):
        keep, top = band_counts(mp, n)
        return [StreamTopK(keep + top, n, device), StreamTopK(top, n, device)]
    return []


def run_chunked(pipe: TaskVectorPipeline, raws: list[torch.Tensor], mps, gp, ctx: TensorContext,
                out: torch.Tensor, *, post: Callable | None = None, check: Callable | None = None) -> torch.Tensor:
    """Merge into ``out`` (any float dtype). ``raws``: flat source tensors then the base, stored dtype.

    ``post(merged, base)`` runs on every merged chunk (e.g. depth scaling); ``check(ts, base, start, end)``
    sees every chunk's float32 task vectors and base before anything else does (e.g. finiteness).
    """
    flat = out.view(-1)
    n = flat.numel()
    count = len(mps)

    def chunks() -> Iterator[tuple[int, int, list[torch.Tensor], torch.Tensor]]:
        for start in range(0, n, BLOCK):
            end = min(n, start + BLOCK)
            base = raws[-1][start:end].to(torch.float32, copy=True)
            yield start, end, [raws[i][start:end].to(torch.float32, copy=True).sub_(base) for i in range(count)], base

    sels = [_selections(pipe, mp, n, out.device) for mp in mps]
    live = [(i, s) for i, row in enumerate(sels) for s in row if not s.trivial]
    if live and in_eager(out.device):
        brackets = settle.sampled_brackets(live, raws, n)
        models = sorted({i for i, _ in live})
        for start in range(0, n, BLOCK):
            end = min(n, start + BLOCK)
            magnitudes = {i: delta_magnitude(raws[i], raws[-1], slice(start, end)) for i in models}
            for i, _, bracket in brackets:
                bracket.observe(magnitudes[i], start)
            del magnitudes
        live = settle.resolve(brackets)
    if live:  # a k-th largest outside its sampled bracket: two exact histogram passes
        for _, _, ts, _ in chunks():
            for i, s in live:
                s.observe_high(ts[i].abs_())
        for _, s in live:
            s.choose_bucket()
        for _, _, ts, _ in chunks():
            for i, s in live:
                s.observe_low(ts[i].abs_())
        for _, s in live:
            s.finish()
    dare = isinstance(pipe.sparsifier, RandomDrop)
    for start, end, ts, base in chunks():
        if check is not None:
            check(ts, base, start, end)
        for i, (t, mp) in enumerate(zip(ts, mps, strict=True)):
            if sels[i]:
                magnitude = t.abs()
                keep = sels[i][0].mask(magnitude)
                if len(sels[i]) == 2:
                    keep.sub_(sels[i][1].mask(magnitude))  # the top band lies within the kept entries
                t.mul_(keep)
            elif dare and mp.density < 1.0:
                u = uniform(ctx.seed, ctx.model_ids[i], ctx.name, start, end, t.device)
                drop_and_rescale(t, u.lt_(mp.density), mp.density, gp.rescale)
        merged = pipe.combine(ts, base, mps, gp)
        flat[start:end] = post(merged, base) if post is not None else merged
    return out


# ---------------------------------------------------------------- fused (compiled) chunk kernels


def fused_structure(pipe, dtypes: tuple[torch.dtype, ...], out_dtype: torch.dtype) -> tuple | None:
    """The kernel structure ``run_fused`` compiles for a merge of inputs of ``dtypes`` (sources then base),
    or None if the method has no fused form.

    Fused forms exist for task arithmetic, TIES, breadcrumbs and DARE (any consensus of none or sign
    election, DARE rescale 'inverse' or 'none'); the other pipelines stay on the eager chunk loop.
    """
    if not isinstance(pipe, TaskVectorPipeline) or pipe.energy_weights:
        return None
    kind = {Sparsifier: "none", Magnitude: "topk", MagnitudeBand: "band", RandomDrop: "drop"}.get(type(pipe.sparsifier))
    if kind is None or type(pipe.consensus) not in (Consensus, SignElection):
        return None
    return kind, type(pipe.consensus) is SignElection, len(dtypes) - 1, dtypes, out_dtype


def native_wanted(structure: tuple, device: torch.device) -> bool:
    """Whether a tensor of ``structure`` (``fused_structure``) is merged by the native top-k kernel on the
    CPU (kernels/native.py) at any size: it has no per-structure compile latency to earn back. Not where
    ``EVOMERGE_COMPILE=0`` keeps every merge eager."""
    kind, _, _, dtypes, out_dtype = structure
    return kind == "topk" and device.type == "cpu" and fused.mode() != "0" \
        and all(d in native.DTYPES for d in (*dtypes, out_dtype)) and native.available() is None


def run_fused(pipe: TaskVectorPipeline, raws: list[torch.Tensor], mps, gp, ctx: TensorContext, out: torch.Tensor,
              *, scale: float = 1.0, on_nonfinite: Callable[[int, int], None] | None = None,
              histograms: settle.HistogramStore | None = None) -> torch.Tensor:
    """Merge into ``out`` like ``run_chunked`` (then depth scaling by ``scale``) with compiled kernels.

    ``raws``: flat sources then the base, stored dtype, on ``out``'s device (CPU: inductor's C++ kernels;
    CUDA: triton). ``on_nonfinite(start, end)`` runs for the chunks (or pieces of chunks) whose inputs or
    result are not all finite, in order, once every result is in ``out`` (it raises, naming the culprit). Raises
    ``fused.Unavailable`` if a kernel cannot be compiled; ``out`` is then partly written.

    Top-k selections (TIES) on the CPU with a ``histograms`` store are settled from magnitude histograms
    (``settle.by_histograms``), taken from the store where it keeps them and given to it when built: worth
    it when the same inputs are merged again with other densities. Otherwise, from sampled brackets.
    """
    kind, sign, count, dtypes, _ = fused_structure(pipe, tuple(r.dtype for r in raws), out.dtype)
    device = out.device
    flat = out.view(-1)
    n = flat.numel()
    step = fused.chunk_size(device)
    spans = [(a, min(n, a + step)) for a in range(0, n, step)]
    zero = torch.zeros((), dtype=torch.float32, device=device)
    scaling = [float(scale), float(scale != 1.0)]
    flags = []
    coefficients = pipe.one_pass_coefficients(mps, gp) if pipe.elementwise else None
    if coefficients is not None and native.supports(raws, flat) and native.available() is None:
        _report(native.ta_merge(raws, flat, [coefficients[0], *coefficients[1]], float(scale)), on_nonfinite)
        return out
    if coefficients is not None:
        ta = fused.kernel(("ta", count, dtypes, out.dtype), lambda: fused.ta_body(count), device)
        fp = torch.tensor([coefficients[0], *coefficients[1], *scaling], dtype=torch.float32, device=device)
        for a, b in spans:
            flags.append(ta(*[r[a:b] for r in raws], fp, zero, flat[a:b]))
        _check(flags, spans, on_nonfinite)
        return out
    sels = [_selections(pipe, mp, n, device) if kind in ("topk", "band") else [] for mp in mps]
    live = [(i, s) for i, row in enumerate(sels) for s in row if not s.trivial]
    by_histogram = kind == "topk" and device.type == "cpu" and histograms is not None
    one_pass = kind == "topk" and native.supports(raws, flat) and native.available() is None
    if live and by_histogram:
        settle.by_histograms(live, raws, spans, dtypes, histograms)
        if not one_pass:
            settle.find_cuts(live, raws, spans, dtypes)
    elif live:
        settle.by_brackets(live, raws, spans, dtypes)
    weights = [mp.weight for mp in mps]
    normalize = gp.normalize if pipe.normalize is None else pipe.normalize
    divisor = sum(weights) if normalize and sum(weights) != 0 else 1.0
    fp = [gp.lam, divisor, *scaling, float(normalize)]
    if one_pass:  # the native kernel places the tie cuts as it merges
        _merge_native(fp, weights, sels, raws, sign, flat, on_nonfinite)
        return out
    for mp, row in zip(mps, sels, strict=True):
        bounds = [s.bound for s in row] + [-1.0, math.inf][len(row):]  # no selection: keep all, cut none
        drop = kind == "drop" and mp.density < 1.0
        p = mp.density if drop else 1.0
        fp += [mp.weight, *bounds, p, p if drop and gp.rescale == "inverse" else 1.0]
    if by_histogram:
        _combine_above(fp, sels, raws, spans, sign, flat, on_nonfinite)
        return out
    fp = torch.tensor(fp, dtype=torch.float32, device=device)
    combine = fused.kernel(("pipe", kind, sign, count, dtypes, out.dtype),
                           lambda: fused.pipe_body(count, kind, sign), device)
    ties = settle.TieCounter([(i, s) for i, s in live if s.cut is None], raws, dtypes)
    for a, b in spans:
        ip = [a]
        for i, row in enumerate(sels):
            ip += [s.tie_cut(a, b, ties.count(s, a, b), ties.nth(i, s, a, b)) for s in row] + [0] * (2 - len(row))
            ip += stream_keys(ctx.seed, ctx.model_ids[i], ctx.name, a) if kind == "drop" else [0, 0]
        ip = torch.tensor(ip, dtype=torch.int64, device=device)
        flags.append(combine(*[r[a:b] for r in raws], fp, ip, zero, flat[a:b]))
    _check(flags, spans, on_nonfinite)
    return out


def _combine_above(fp: list[float], sels, raws: list[torch.Tensor], spans, sign: bool, flat: torch.Tensor,
                   on_nonfinite) -> None:
    """The combining pass of top-k selections settled with their tie cuts: every chunk is split where a
    selection stops keeping its ties, so each piece keeps |t| above one bound per model (kernel kind 'above')."""
    count = len(raws) - 1
    device = flat.device
    dtypes = tuple(r.dtype for r in raws)
    combine = fused.kernel(("pipe", "above", sign, count, dtypes, flat.dtype),
                           lambda: fused.pipe_body(count, "above", sign), device)
    ip = torch.zeros(1 + 4 * count, dtype=torch.int64, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    cuts = sorted({s.cut for row in sels for s in row if s.cut is not None})
    flags, pieces = [], []
    for a, b in spans:
        points = [a, *(c for c in cuts if a < c < b), b]
        for lo, hi in zip(points[:-1], points[1:], strict=True):
            for i, row in enumerate(sels):
                fp[6 + 5 * i] = _bound(row[0], lo, hi) if row else -1.0
            params = torch.tensor(fp, dtype=torch.float32, device=device)
            if hi - lo == 1:  # one entry: run it twice, a length-1 input would compile a kernel of its own
                dst = torch.empty(2, dtype=flat.dtype, device=device)
                flags.append(combine(*[r[lo:hi].repeat(2) for r in raws], params, ip, zero, dst))
                flat[lo:hi] = dst[:1]
            else:
                flags.append(combine(*[r[lo:hi] for r in raws], params, ip, zero, flat[lo:hi]))
            pieces.append((lo, hi))
    _check(flags, pieces, on_nonfinite)


def _merge_native(fp: list[float], weights: list[float], sels, raws: list[torch.Tensor], sign: bool,
                  flat: torch.Tensor, on_nonfinite) -> None:
    """The combining pass of settled top-k selections by the native kernel (kernels/native.py)."""
    thresholds, wanted, ties = [], [], []
    for row in sels:
        s = row[0] if row else None
        if s is None or s.trivial:
            thresholds.append(-1.0 if s is None or s.k > 0 else math.inf)  # keep all, or none
        elif _keeps_every_tie(s):
            thresholds.append(_below(s.threshold))
        else:
            thresholds.append(s.threshold)
            wanted.append(s.ties_wanted)
            ties.append(s.ties_total)
            continue
        wanted.append(0)
        ties.append(0)
    _report(native.topk_merge(raws, flat, weights, thresholds, wanted, ties, fp[:5], sign), on_nonfinite)


def _report(positions: list[int], on_nonfinite) -> None:
    """``on_nonfinite`` for each non-finite result a native kernel found (the first of each range)."""
    if on_nonfinite is not None:
        for pos in positions:
            on_nonfinite(pos, pos + 1)


def _keeps_every_tie(s: StreamTopK) -> bool:
    """Whether a settled, non-trivial selection keeps every value equal to its threshold. Ties of a zero
    threshold are kept: keeping a zero entry of a task vector changes nothing."""
    return s.ties_wanted == s.ties_total or s.threshold == 0.0


def _below(x: float) -> float:
    """The float32 just below float32 ``x``."""
    return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-math.inf)))


def _bound(s: StreamTopK, start: int, end: int) -> float:
    """The magnitude that entries of [start, end) must exceed to be kept by selection ``s``; the piece lies
    wholly before or after the selection's tie cut."""
    if s.trivial:
        return -1.0 if s.k > 0 else math.inf
    if _keeps_every_tie(s) or (s.cut is not None and end <= s.cut):
        return _below(s.threshold)
    return s.threshold


def _check(flags: list[torch.Tensor], spans, on_nonfinite) -> None:
    """Call ``on_nonfinite(a, b)`` for each chunk [a, b) whose merging kernel's flag is not 0 (NaN: some input
    or result entry is not finite). One read of all flags: no device round trip per chunk."""
    if on_nonfinite is None or not flags:
        return
    for flag, (a, b) in zip(torch.stack(flags).tolist(), spans, strict=True):
        if flag != 0.0:
            on_nonfinite(a, b)


