"""Settling a tensor's top-k selections (TIES trimming, breadcrumbs bands) before its combining pass.

Each selection (a StreamTopK) needs its k-th largest task-vector magnitude over the whole tensor, how many
values equal it, and, when only some of those are kept (lowest position first), where they stop (the tie
cut). Three ways, all exact, all over the chunks of flat stored-dtype inputs:

- ``by_brackets``: a sampled bracket (kernels/bracket.py) and one counting pass (native on the CPU, else a
  fused kernel); what a sample misses goes to ``exactly``;
- ``exactly``: two histogram passes (StreamTopK) with fused kernels computing the keys;
- ``by_histograms``: kept magnitude histograms (kernels/histogram.py) where merges repeat, then
  ``find_cuts`` unless the native kernel merges (it places the tie cuts as it goes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evomerge.kernels import fused, native
from evomerge.kernels.bracket import Bracket, Settled, delta_magnitude, sample_positions
from evomerge.kernels.histogram import HistogramBuilder, MagnitudeHistogram, impure_bounds
from evomerge.kernels.select import StreamTopK


def sampled_brackets(live, raws: list[torch.Tensor], n: int) -> list[tuple[int, StreamTopK, Bracket]]:
    """A sampled bracket for every live selection (``live``: (model, selection) pairs); flat ``raws``."""
    positions = sample_positions(n)
    samples = {i: delta_magnitude(raws[i], raws[-1], positions) for i in sorted({i for i, _ in live})}
    return [(i, s, Bracket(s.k, n, samples[i])) for i, s in live]


def resolve(brackets) -> list[tuple[int, StreamTopK]]:
    """Settle every selection whose bracket holds its k-th largest; the others, for the histogram passes."""
    rest = []
    for i, s, bracket in brackets:
        settled = bracket.resolve()
        if settled is None:
            rest.append((i, s))
        else:
            s.settle(settled)
    return rest


class HistogramStore:
    """Where ``run_fused`` keeps the magnitude histograms of one tensor's task vectors (source i against the
    base) for later merges of the same inputs. ``place(i)`` gives the dict and the key under which source
    i's histogram is kept; by default a dict of the store's own (``kept``), keyed by i."""

    def __init__(self, place: Callable[[int], tuple[dict, object]] | None = None):
        self.kept: dict = {}
        self._place = place or (lambda i: (self.kept, i))

    def get(self, i: int) -> MagnitudeHistogram | None:
        kept, key = self._place(i)
        return kept.get(key)

    def put(self, i: int, histogram: MagnitudeHistogram) -> None:
        kept, key = self._place(i)
        kept[key] = histogram


def by_histograms(live, raws: list[torch.Tensor], spans, dtypes, store: HistogramStore) -> None:
    """Settle the live top-k selections from each source's magnitude histogram (kernels/histogram.py), built
    by one pass (native, or a fused kernel) where ``store`` has none. A threshold equal to its bucket's
    value is exact at once; otherwise the bucket's impure members bound an exact bracket for one counting
    pass."""
    count = len(raws) - 1
    device = raws[-1].device
    models = sorted({i for i, _ in live})
    hists = {i: store.get(i) for i in models}
    missing = tuple(i for i in models if hists[i] is None)
    if missing and len(missing) <= 64 and native.supports(raws) and native.available() is None:
        def keys(*chunk):
            return native.histogram_keys(list(chunk), missing)
    elif missing:
        keys = fused.kernel(("keys", count, dtypes, missing), lambda: fused.histogram_keys_body(count, missing),
                            device, exact_casts=True)
    if missing:
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
        observe(brackets[group:group + 8], raws, spans, dtypes)
    rest = resolve(brackets)
    if rest:  # NaN among the magnitudes: the counts do not add up (the merge then names the culprit)
        exactly(rest, raws, spans, dtypes)


def find_cuts(live, raws: list[torch.Tensor], spans, dtypes) -> None:
    """The tie cut of every settled selection that keeps some but not all entries equal to its threshold:
    one past the position of the last kept tie, found by counting ties chunk by chunk until it is reached."""
    pending = [(i, s) for i, s in live
               if s.cut is None and s.ties_wanted < s.ties_total and s.threshold != 0.0]
    if not pending:
        return
    ties = TieCounter(pending, raws, dtypes)
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


def by_brackets(live, raws: list[torch.Tensor], spans, dtypes) -> None:
    """Settle every live StreamTopK: from sampled brackets and one fused counting pass where the k-th largest
    lies in its bracket, else by two histogram passes with fused kernels computing the keys."""
    brackets = sampled_brackets(live, raws, spans[-1][1])
    for group in range(0, len(brackets), 8):  # one uint8 of flags per entry holds the bits of 8 selections
        observe(brackets[group:group + 8], raws, spans, dtypes)
    exactly(resolve(brackets), raws, spans, dtypes)


def exactly(live, raws: list[torch.Tensor], spans, dtypes) -> None:
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

    each_chunk(spans, lambda a, b: bits(*[r[a:b] for r in raws]), high)
    for _, s in live:
        s.choose_bucket()
    owners = tuple(i for i, _ in live)
    low = fused.kernel(("low", count, dtypes, owners), lambda: fused.low_keys_body(count, owners), device)
    ranges = torch.tensor([s.bucket_range() for _, s in live], dtype=torch.float32, device=device)

    def low_counts(keys) -> None:
        for (_, s), k in zip(live, keys, strict=True):
            s.add_low(torch.bincount(k, minlength=fused.LOW_BINS + fused.SPREAD))

    each_chunk(spans, lambda a, b: low(*[r[a:b] for r in raws], ranges), low_counts)
    for _, s in live:
        s.finish()


def observe(brackets, raws: list[torch.Tensor], spans, dtypes) -> None:
    """The brackets' counting pass: by the native kernel on the CPU where it is available (one call),
    else with one fused kernel per chunk (at most 8 brackets): counts, then the positions flagged inside
    some bracket, then for each bracket its positions and their values."""
    if native.supports(raws) and native.available() is None:
        found = native.observe_brackets(raws, [i for i, _, _ in brackets], [b.bounds for _, _, b in brackets])
        for (_, _, bracket), (counts, positions, values) in zip(brackets, found, strict=True):
            bracket.add(counts, positions, values)
        return
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


def each_chunk(spans, keys: Callable, histogram: Callable) -> None:
    """``histogram(keys(a, b))`` for every chunk [a, b)."""
    for a, b in spans:
        histogram(keys(a, b))


class TieCounter:
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
