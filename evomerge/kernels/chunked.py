"""Task-vector pipelines over chunks of a large tensor, with the same result as the whole-tensor path.

Selections that need the whole tensor (TIES trimming, breadcrumbs bands) are settled first: by one
counting pass over the chunks around a bracket guessed from a sample (kernels/bracket.py; fused kernels,
and eager code off the CPU), or by two exact histogram passes (StreamTopK; eager CPU code, and any k-th
largest outside its bracket); then every chunk runs sparsify,
consensus and the combination entrywise, in cache. Inputs stay in their stored dtype; float32 exists one chunk at a time,
so memory stays near the stored inputs plus the output, and each value moves through main memory a
few times instead of once per operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from evomerge.kernels import fused
from evomerge.kernels.bracket import Bracket, Settled, delta_magnitude, in_eager, sample_positions
from evomerge.kernels.histogram import HistogramBuilder, MagnitudeHistogram, impure_bounds
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


def _brackets(live, raws: list[torch.Tensor], n: int) -> list[tuple[int, StreamTopK, Bracket]]:
    """A sampled bracket for every live selection (``live``: (model, selection) pairs); flat ``raws``."""
    positions = sample_positions(n)
    samples = {i: delta_magnitude(raws[i], raws[-1], positions) for i in sorted({i for i, _ in live})}
    return [(i, s, Bracket(s.k, n, samples[i])) for i, s in live]


def _resolve(brackets) -> list[tuple[int, StreamTopK]]:
    """Settle every selection whose bracket holds its k-th largest; the others, for the histogram passes."""
    rest = []
    for i, s, bracket in brackets:
        settled = bracket.resolve()
        if settled is None:
            rest.append((i, s))
        else:
            s.settle(settled)
    return rest


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
        brackets = _brackets(live, raws, n)
        models = sorted({i for i, _ in live})
        for start in range(0, n, BLOCK):
            end = min(n, start + BLOCK)
            magnitudes = {i: delta_magnitude(raws[i], raws[-1], slice(start, end)) for i in models}
            for i, _, bracket in brackets:
                bracket.observe(magnitudes[i], start)
            del magnitudes
        live = _resolve(brackets)
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


class HistogramStore:
    """Where ``run_fused`` keeps the magnitude histograms of one tensor's task vectors for later merges of the
    same inputs: ``get(i)`` the histogram of source i against the base (None if not kept), ``put(i, h)``."""

    def get(self, i: int) -> MagnitudeHistogram | None:
        return None

    def put(self, i: int, histogram: MagnitudeHistogram) -> None:
        pass


def run_fused(pipe: TaskVectorPipeline, raws: list[torch.Tensor], mps, gp, ctx: TensorContext, out: torch.Tensor,
              *, scale: float = 1.0, on_nonfinite: Callable[[int, int], None] | None = None,
              histograms: HistogramStore | None = None) -> torch.Tensor:
    """Merge into ``out`` like ``run_chunked`` (then depth scaling by ``scale``) with compiled kernels.

    ``raws``: flat sources then the base, stored dtype, on ``out``'s device (CPU: inductor's C++ kernels;
    CUDA: triton). ``on_nonfinite(start, end)`` runs for the chunks (or pieces of chunks) whose inputs or
    result are not all finite, in order, once every result is in ``out`` (it raises, naming the culprit). Raises
    ``fused.Unavailable`` if a kernel cannot be compiled; ``out`` is then partly written.

    Top-k selections (TIES) on the CPU with a ``histograms`` store are settled from magnitude histograms
    (``_settle_by_histograms``), taken from the store where it keeps them and given to it when built: worth
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
    if live and by_histogram:
        _settle_by_histograms(live, raws, spans, dtypes, histograms)
        _find_cuts(live, raws, spans, dtypes)
    elif live:
        _settle(live, raws, spans, dtypes)
    weights = [mp.weight for mp in mps]
    normalize = gp.normalize if pipe.normalize is None else pipe.normalize
    divisor = sum(weights) if normalize and sum(weights) != 0 else 1.0
    fp = [gp.lam, divisor, *scaling, float(normalize)]
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
    ties = _TieCounter([(i, s) for i, s in live if s.cut is None], raws, dtypes)
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


def _below(x: float) -> float:
    """The float32 just below float32 ``x``."""
    return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-math.inf)))


def _bound(s: StreamTopK, start: int, end: int) -> float:
    """The magnitude that entries of [start, end) must exceed to be kept by selection ``s``; the piece lies
    wholly before or after the selection's tie cut. Ties of a zero threshold are kept: keeping a zero entry
    of a task vector changes nothing."""
    if s.trivial:
        return -1.0 if s.k > 0 else math.inf
    if s.ties_wanted == s.ties_total or s.threshold == 0.0 or (s.cut is not None and end <= s.cut):
        return _below(s.threshold)
    return s.threshold


def _settle_by_histograms(live, raws: list[torch.Tensor], spans, dtypes, store: HistogramStore) -> None:
    """Settle the live top-k selections from each source's magnitude histogram (kernels/histogram.py), built
    by one fused pass where ``store`` has none. A threshold equal to its bucket's value is exact at
    once; otherwise the bucket's impure members bound an exact bracket for one counting pass."""
    count = len(raws) - 1
    device = raws[-1].device
    models = sorted({i for i, _ in live})
    hists = {i: store.get(i) for i in models}
    missing = tuple(i for i in models if hists[i] is None)
    if missing:
        keys = fused.kernel(("keys", count, dtypes, missing), lambda: fused.histogram_keys_body(count, missing),
                            device, exact_casts=True)
        builders = [HistogramBuilder(device) for _ in missing]
        for a, b in spans:
            out = keys(*[r[a:b] for r in raws])
            for j, builder in enumerate(builders):
                key, mark, impure, largest = out[4 * j: 4 * j + 4]
                builder.add(key.view(torch.int16), mark.view(torch.int16) if float(impure) else None, float(largest))
        for i, builder in zip(missing, builders, strict=True):
            hists[i] = builder.finish()
            store.put(i, hists[i])
    brackets = []
    for i, s in live:
        at = hists[i].locate(s.k)
        if s.k - at.above > at.impure:  # the k-th largest is the bucket's value, which its pure members equal
            s.settle(Settled(at.value, at.above + at.impure, at.count - at.impure, None))
        else:
            brackets.append((i, s, Bracket.between(s.k, s.n, *impure_bounds(at.key))))
    for group in range(0, len(brackets), 8):
        _observe(brackets[group:group + 8], raws, spans, dtypes)
    rest = _resolve(brackets)
    if rest:  # NaN among the magnitudes: the counts do not add up (the merge then names the culprit)
        _settle_exactly(rest, raws, spans, dtypes)


def _find_cuts(live, raws: list[torch.Tensor], spans, dtypes) -> None:
    """The tie cut of every settled selection that keeps some but not all entries equal to its threshold:
    one past the position of the last kept tie, found by counting ties chunk by chunk until it is reached."""
    pending = [(i, s) for i, s in live
               if s.cut is None and s.ties_wanted < s.ties_total and s.threshold != 0.0]
    if not pending:
        return
    ties = _TieCounter(pending, raws, dtypes)
    seen = [0] * len(pending)
    for a, b in spans:
        for j, (i, s) in enumerate(pending):
            if s.cut is not None:
                continue
            found = ties.count(s, a, b)()
            wanted = s.ties_wanted - seen[j]
            if found >= wanted:
                s.cut = ties.nth(i, s, a, b)(wanted) + 1
            seen[j] += found
        if all(s.cut is not None for _, s in pending):
            return
    raise RuntimeError("fewer ties than counted: the inputs changed during the merge")


def _check(flags: list[torch.Tensor], spans, on_nonfinite) -> None:
    """Call ``on_nonfinite(a, b)`` for each chunk [a, b) whose merging kernel's flag is not 0 (NaN: some input
    or result entry is not finite). One read of all flags: no device round trip per chunk."""
    if on_nonfinite is None or not flags:
        return
    for flag, (a, b) in zip(torch.stack(flags).tolist(), spans, strict=True):
        if flag != 0.0:
            on_nonfinite(a, b)


def _settle(live, raws: list[torch.Tensor], spans, dtypes) -> None:
    """Settle every live StreamTopK: from sampled brackets and one fused counting pass where the k-th largest
    lies in its bracket, else by two histogram passes with fused kernels computing the keys."""
    brackets = _brackets(live, raws, spans[-1][1])
    for group in range(0, len(brackets), 8):  # one uint8 of flags per entry holds the bits of 8 selections
        _observe(brackets[group:group + 8], raws, spans, dtypes)
    _settle_exactly(_resolve(brackets), raws, spans, dtypes)


def _settle_exactly(live, raws: list[torch.Tensor], spans, dtypes) -> None:
    """Settle selections by two exact histogram passes (StreamTopK) with fused kernels computing the keys."""
    if not live:
        return
    count = len(raws) - 1
    device = raws[-1].device
    models = tuple(sorted({i for i, _ in live}))
    bits = fused.kernel(("bits", count, dtypes, models), lambda: fused.magnitude_bits_body(count, models), device)

    def high(keys) -> None:
        for i, k in zip(models, keys, strict=True):
            counts = torch.bincount(k.bitwise_right_shift_(16), minlength=1 << 15)
            for j, s in live:
                if j == i:  # breadcrumbs: both selections of a model see the same histogram
                    s.add_high(counts)

    _each_chunk(spans, lambda a, b: bits(*[r[a:b] for r in raws]), high)
    for _, s in live:
        s.choose_bucket()
    owners = tuple(i for i, _ in live)
    low = fused.kernel(("low", count, dtypes, owners), lambda: fused.low_keys_body(count, owners), device)
    ranges = torch.tensor([s.bucket_range() for _, s in live], dtype=torch.float32, device=device)

    def low_counts(keys) -> None:
        for (_, s), k in zip(live, keys, strict=True):
            s.add_low(torch.bincount(k, minlength=fused.LOW_BINS + fused.SPREAD))

    _each_chunk(spans, lambda a, b: low(*[r[a:b] for r in raws], ranges), low_counts)
    for _, s in live:
        s.finish()


def _observe(brackets, raws: list[torch.Tensor], spans, dtypes) -> None:
    """The brackets' counting pass with one fused kernel per chunk (at most 8 brackets): counts, then the
    positions flagged inside some bracket, then for each bracket its positions and their values."""
    count = len(raws) - 1
    device = raws[-1].device
    owners = tuple(i for i, _, _ in brackets)
    kernel = fused.kernel(("bracket", count, dtypes, owners),
                          lambda: fused.bracket_body(count, owners), device)
    bounds = torch.tensor([b.bounds for _, _, b in brackets], dtype=torch.float32, device=device)
    for a, b in spans:
        counts, flags = kernel(*[r[a:b] for r in raws], bounds)
        flagged = torch.nonzero(flags).view(-1)
        bits = flags[flagged]
        for s, (i, _, bracket) in enumerate(brackets):
            idx = flagged[bits.bitwise_and(1 << s) != 0] if len(brackets) > 1 else flagged
            bracket.add(counts[s], idx + a, delta_magnitude(raws[i][a:b], raws[-1][a:b], idx))


def _each_chunk(spans, keys: Callable, histogram: Callable) -> None:
    """``histogram(keys(a, b))`` for every chunk [a, b)."""
    for a, b in spans:
        histogram(keys(a, b))


class _TieCounter:
    """Where the values equal to each live selection's threshold lie in a chunk: counts per TIE_BLOCK block
    from one fused kernel call (made only while some selection still places its last kept tie), then
    the position of the j-th inside its block, eagerly. For selections whose tie cut is not known yet."""

    def __init__(self, live, raws: list[torch.Tensor], dtypes):
        self.live, self.raws, self.at, self.blocks = live, raws, None, None
        count = len(raws) - 1
        owners = tuple(i for i, _ in live)
        device = raws[-1].device
        self.kernel = fused.kernel(("ties", count, dtypes, owners), lambda: fused.tie_count_body(count, owners),
                                   device) if live else None
        self.thr = torch.tensor([s.bound for _, s in live], dtype=torch.float32, device=device)

    def _magnitude(self, i: int, a: int, b: int) -> torch.Tensor:
        return delta_magnitude(self.raws[i], self.raws[-1], slice(a, b))

    def _counts(self, a: int, b: int) -> torch.Tensor:
        """int64 [S, blocks]: ties per block of [a, b); a last partial block is counted eagerly."""
        if self.at != a:
            size = fused.TIE_BLOCK
            whole = (b - a) // size * size
            parts = []
            if whole:
                parts.append(self.kernel(*[r[a:a + whole].view(-1, size) for r in self.raws], self.thr))
            if whole < b - a:
                parts.append(torch.stack([(self._magnitude(i, a + whole, b) == s.bound).sum().view(1)
                                          for i, s in self.live]))
            self.blocks, self.at = torch.cat(parts, dim=1), a
        return self.blocks

    def _index(self, sel: StreamTopK) -> int:
        return next(k for k, (_, s) in enumerate(self.live) if s is sel)

    def count(self, sel: StreamTopK, a: int, b: int) -> Callable[[], int]:
        return lambda: int(self._counts(a, b)[self._index(sel)].sum())

    def nth(self, i: int, sel: StreamTopK, a: int, b: int) -> Callable[[int], int]:
        def position(j: int) -> int:
            running = self._counts(a, b)[self._index(sel)].cumsum(0)
            block = int(torch.searchsorted(running, j))  # the first block where the running count reaches j
            before = int(running[block - 1]) if block else 0
            lo = a + block * fused.TIE_BLOCK
            ties = torch.nonzero(self._magnitude(i, lo, min(b, lo + fused.TIE_BLOCK)) == sel.bound).flatten()
            return lo + int(ties[j - before - 1])
        return position
