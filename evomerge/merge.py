"""Execute a merge plan: stream tensors from the sources through a kernel into the output checkpoint.

Memory: at any time the process holds the inputs of one output tensor (sources + base, float32), the
result and the kernel's temporaries, about (sources + 2) x the largest tensor.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from evomerge.checkpoint.writer import CheckpointWriter, output_config
from evomerge.errors import NonFiniteError
from evomerge.plan import MergePlan, TensorJob

log = logging.getLogger(__name__)


def _finite(t: torch.Tensor, what: str) -> None:
    # A sum is one fast pass and any NaN/inf makes it non-finite; only then run the exact (slower) check,
    # since a huge finite tensor can also overflow the sum.
    if t.dtype.is_floating_point and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} contains NaN or infinity")


CHUNK = 1 << 18  # elements per chunk for elementwise methods: 1 MiB of float32, stays in cache


def merge_tensor(plan: MergePlan, job: TensorJob, device: torch.device | str = "cpu") -> torch.Tensor:
    """The merged value of one output tensor (float32 or the output dtype, on ``device``)."""
    cks = plan.checkpoints
    if job.copy:
        ref = job.inputs[0]
        return cks[ref.model].get(ref.name, dtype=None, device=device)
    if plan.method.elementwise and job.vocab_rows is None and job.out.nbytes > 4 * CHUNK:
        return _merge_chunked(plan, job, device)
    xs = []
    for ref in job.inputs:
        x = cks[ref.model].get(ref.name, device=device)
        _finite(x, f"tensor '{ref.name}' of model '{plan.model_names[ref.model]}'")
        xs.append(x)
    base = None
    if job.base is not None:
        base = cks[job.base.model].get(job.base.name, device=device)
        _finite(base, f"tensor '{job.base.name}' of base model '{plan.model_names[job.base.model]}'")
    full_rows = None
    if job.vocab_rows is not None:
        # Vocabulary sizes differ: merge the common rows, keep the donor's rows beyond them.
        refs = [*job.inputs, *([job.base] if job.base else [])]
        loaded = xs + ([base] if base is not None else [])
        full_rows = next((t for r, t in zip(refs, loaded, strict=True) if r.model == plan.donor), loaded[0]).clone()
        xs = [x[: job.vocab_rows].contiguous() for x in xs]
        base = base[: job.vocab_rows].contiguous() if base is not None else None
    out = plan.method.fn(xs, base, list(job.model_params), job.global_params, job.ctx)
    if plan.recipe.depth_scaling is not None:
        out = plan.recipe.depth_scaling.apply(out, base, job.ctx.depth)
    if full_rows is not None:
        full_rows[: job.vocab_rows] = out
        out = full_rows
    _finite(out, f"the merged tensor '{job.out.name}' (method {plan.method.name})")
    return out


def run_merge(plan: MergePlan, out_dir: str | Path, *, device: str = "cpu", max_shard_bytes: int = 5 * 10**9,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Merge every tensor of ``plan`` into a new HF checkpoint at ``out_dir``; nothing is left there on error."""
    from tqdm.auto import tqdm

    from evomerge.util.memory import reuse_large_allocations

    reuse_large_allocations()
    writer = CheckpointWriter(out_dir, [j.out for j in plan.jobs], max_shard_bytes=max_shard_bytes,
                              overwrite=overwrite)
    try:
        bar = tqdm(plan.jobs, desc=f"merge ({plan.method.name})", unit="tensor", disable=not progress)
        for job in bar:
            writer.write(job.out.name, merge_tensor(plan, job, device))
        donor = plan.checkpoints[plan.donor]
        config = output_config(donor.config, dtype=plan.out_dtype, layer_origin=plan.layer_origin)
        return writer.finish(config, donor.path)
    except BaseException:
        writer.abort()
        raise


def _merge_chunked(plan: MergePlan, job: TensorJob, device) -> torch.Tensor:
    """Elementwise methods on large tensors: run the kernel chunk by chunk on cache-sized float32 pieces.

    Bit-identical to the whole-tensor path (each output entry sees the same operations), with inputs kept
    in their stored dtype: memory and bandwidth drop by the float32 copies that are never made.
    """
    cks = plan.checkpoints
    refs = [*job.inputs, *([job.base] if job.base else [])]
    raws = [cks[r.model].get(r.name, dtype=None, device=device).reshape(-1) for r in refs]
    out = torch.empty(job.out.shape, dtype=job.out.dtype, device=device)
    flat = out.view(-1)
    n = flat.numel()
    mps = list(job.model_params)
    scaling = plan.recipe.depth_scaling
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        pieces = [r[start:end].float() for r in raws]
        xs = pieces[: len(job.inputs)]
        base = pieces[len(job.inputs)] if job.base else None
        merged = plan.method.fn(xs, base, mps, job.global_params, job.ctx)
        if scaling is not None:
            merged = scaling.apply(merged, base, job.ctx.depth)
        if not math.isfinite(float(merged.sum())):
            # In an elementwise method any NaN/inf input reaches the output (0 * inf is NaN too), so
            # checking the output is enough; name the input responsible, if any.
            for ref, raw in zip(refs, raws, strict=True):
                _finite(raw[start:end].float(), f"tensor '{ref.name}' of model '{plan.model_names[ref.model]}'")
            _finite(merged, f"the merged tensor '{job.out.name}' (method {plan.method.name})")
        flat[start:end] = merged
    return out
