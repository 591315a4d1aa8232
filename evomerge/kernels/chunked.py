"""Task-vector pipelines over chunks of a large tensor, with the same result as the whole-tensor path.

Selections that need the whole tensor (TIES trimming, breadcrumbs bands) are settled first by two
histogram passes over the chunks (StreamTopK); then every chunk runs sparsify, consensus and the
combination entrywise, in cache. Inputs stay in their stored dtype; float32 exists one chunk at a time,
so memory stays near the stored inputs plus the output, and each value moves through main memory a
few times instead of once per operation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from evomerge.kernels.registry import TensorContext
from evomerge.kernels.select import BLOCK, StreamTopK, exact_count, uniform
from evomerge.kernels.taskvector import (
    Magnitude,
    MagnitudeBand,
    RandomDrop,
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
    if live:
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
                    keep &= ~sels[i][1].mask(magnitude)
                t.mul_(keep)
            elif dare and mp.density < 1.0:
                u = uniform(ctx.seed, ctx.model_ids[i], ctx.name, start, end, t.device)
                drop_and_rescale(t, u < mp.density, mp.density, gp.rescale)
        merged = pipe.combine(ts, base, mps, gp)
        flat[start:end] = post(merged, base) if post is not None else merged
    return out
