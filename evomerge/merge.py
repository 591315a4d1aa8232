"""Execute a merge plan: stream tensors from the sources through a kernel into the output checkpoint.

Tensors are read in their stored dtype and the results written by one I/O thread (inputs one job ahead,
results one job behind, so reading and writing overlap the arithmetic), merged on the compute device,
and written at their place in the output. Large tensors of chunkable methods are merged in chunks
with float32 existing one chunk at a time: by compiled kernels (kernels/fused.py; CPU or CUDA, when
enabled, see EVOMERGE_COMPILE) or by eager torch chunk loops; the rest whole, in float32. Memory at any time:
the stored-dtype inputs of two jobs, one result waiting for its write, and the float32 inputs, result
and temporaries of one job, about (sources + 2) x the largest tensor in float32.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from evomerge.checkpoint.writer import CheckpointWriter, output_config
from evomerge.errors import NonFiniteError
from evomerge.kernels import chunked, fused, geometric, settle
from evomerge.kernels.select import BLOCK
from evomerge.plan import InputRef, MergePlan, TensorJob

log = logging.getLogger(__name__)
CHUNK = BLOCK  # elements per chunk (1 MiB of float32: stays in cache)
_SAFE_FLOAT32 = torch.finfo(torch.float32).max / 16  # sizes this far below the float32 range stay finite


def _finite(t: torch.Tensor, what: str) -> None:
    # A sum is one fast pass and any NaN/inf makes it non-finite; only then run the exact (slower) check,
    # since a huge finite tensor can also overflow the sum.
    if t.dtype.is_floating_point and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} contains NaN or infinity")


def _refs(job: TensorJob) -> list[InputRef]:
    return [*job.inputs, *([job.base] if job.base else [])]


def _describe(plan: MergePlan, ref: InputRef) -> str:
    return f"tensor '{ref.name}' of model '{plan.model_names[ref.model]}'"


def load_inputs(plan: MergePlan, job: TensorJob, *, borrow: bool = False) -> list[torch.Tensor]:
    """The job's inputs (sources, then base) in their stored dtype, on the CPU: owned copies, or with
    ``borrow`` views of the mapped files where the checkpoints are mapped (read-only, see Checkpoint.borrow)."""
    if borrow:
        return [plan.checkpoints[r.model].borrow(r.name) for r in _refs(job)]
    return [plan.checkpoints[r.model].get(r.name, dtype=None) for r in _refs(job)]


def merge_tensor(plan: MergePlan, job: TensorJob, device: torch.device | str = "cpu",
                 raws: list[torch.Tensor] | None = None, *, borrow: bool = False) -> torch.Tensor:
    """The merged value of one output tensor, on ``device``. ``raws``: inputs already loaded.

    ``borrow``: the inputs (``raws``, or what is read when none are given) may be shared, read-only
    tensors such as views of mapped checkpoint files; they are copied before anything writes into them,
    and the result of a plain copy job may itself view them (read it, never write it).
    """
    raws = load_inputs(plan, job, borrow=borrow) if raws is None else raws
    if job.copy:
        return raws[0].to(device)
    numel = math.prod(job.out.shape)
    structure = _fused_structure(plan, job, raws)
    dev = torch.device(device)
    if structure is not None and (fused.wanted(structure, numel, dev) or chunked.native_wanted(structure, dev)):
        out = _merge_fused(plan, job, raws, dev)
        if out is not None:
            return _stored(plan, job, out)
    start = time.perf_counter()
    out = _merge_eager(plan, job, device, raws, borrow)
    if structure is not None and numel >= fused.MIN_NUMEL:
        fused.note_eager(structure, time.perf_counter() - start)
    return _stored(plan, job, out)


def _stored(plan: MergePlan, job: TensorJob, out: torch.Tensor) -> torch.Tensor:
    """``out`` as a float16 output stores it, refused if the cast overflowed; other outputs unchanged.

    Every value was checked finite in float32, but float16 ends at 65504: a larger merged value would be
    written as infinity. bfloat16 shares float32's range."""
    if job.out.dtype != torch.float16:
        return out
    out = out.to(torch.float16)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"the merged tensor '{job.out.name}' (method {plan.method.name}) overflows float16 "
                             "(largest finite value 65504): write bfloat16 or float32 (the recipe's dtype), or "
                             "merge with smaller weights")
    return out


def _fused_structure(plan: MergePlan, job: TensorJob, raws: list[torch.Tensor]) -> tuple | None:
    """The compiled-kernel structure for this job, or None if it has no fused form."""
    fn = plan.method.fn
    if job.vocab_rows is not None or job.base is None or not chunked.supports(fn, job.model_params, job.global_params):
        return None
    return chunked.fused_structure(fn, tuple(r.dtype for r in raws), job.out.dtype)


def _merge_fused(plan: MergePlan, job: TensorJob, raws: list[torch.Tensor],
                 device: torch.device) -> torch.Tensor | None:
    """Merge with compiled chunk kernels on ``device``; None if they are unavailable (the caller merges eagerly)."""
    refs = _refs(job)
    flats = [r.to(device).reshape(-1) for r in raws]
    out = torch.empty(job.out.shape, dtype=job.out.dtype, device=device)
    what = f"the merged tensor '{job.out.name}' (method {plan.method.name})"

    def on_nonfinite(start: int, end: int) -> None:
        for ref, r in zip(refs, flats, strict=True):
            _finite(r[start:end].float(), _describe(plan, ref))
        _finite(out.view(-1)[start:end].float(), what)

    scaling = plan.recipe.depth_scaling
    try:
        return chunked.run_fused(plan.method.fn, flats, list(job.model_params), job.global_params, job.ctx, out,
                                 scale=scaling.scale(job.ctx.depth) if scaling is not None else 1.0,
                                 on_nonfinite=on_nonfinite,
                                 histograms=_kept_histograms(plan, job) if fused.repeats_expected() else None)
    except fused.Unavailable:
        return None


def _kept_histograms(plan: MergePlan, job: TensorJob) -> settle.HistogramStore:
    """Magnitude histograms kept with each source's open checkpoint (``Checkpoint.derived``), keyed by the
    tensor and the base's opening: a search's later candidates with other densities reuse them, and a
    checkpoint that changes on disk is opened afresh, without them. Used in processes that merge the same
    sources again and again (fused.expect_repeats: a search's evaluator); a single merge settles its
    selections from sampled brackets, which costs less than building histograms it would use once."""
    base = plan.checkpoints[job.base.model]

    def place(i: int) -> tuple[dict, tuple]:
        ref = job.inputs[i]
        return plan.checkpoints[ref.model].derived, ("magnitudes", ref.name, base.opening, job.base.name)

    return settle.HistogramStore(place)


def _merge_eager(plan: MergePlan, job: TensorJob, device: torch.device | str, raws: list[torch.Tensor],
                 borrow: bool = False) -> torch.Tensor:
    """Eager torch: chunk loops for large tensors of chunkable methods, else the whole tensor in float32."""
    if job.vocab_rows is None and job.out.nbytes > 4 * CHUNK:
        if plan.method.elementwise:
            return _merge_chunked(plan, job, [r.to(device) for r in raws])
        if job.base is not None and chunked.supports(plan.method.fn, job.model_params, job.global_params):
            return _merge_pipeline_chunked(plan, job, [r.to(device) for r in raws])
        if plan.method.fn is geometric.slerp:
            return _merge_slerp_chunked(plan, job, [r.to(device) for r in raws])
    refs = _refs(job)
    loaded = []
    # A borrowed input is copied (one cast-copy) unless the kernel says it only reads its inputs (a method's
    # optional keeps_inputs(model_params, global_params)); an owned input is ours to write.
    keeps = getattr(plan.method.fn, "keeps_inputs", None)
    copy = borrow and not (keeps is not None and keeps(job.model_params, job.global_params))
    for ref, raw in zip(refs, raws, strict=True):
        x = raw.to(device=device, dtype=torch.float32, copy=copy)
        checked = plan.checkpoints[ref.model].finite
        if ref.name not in checked:  # once per tensor while its file is unchanged (a search re-reads them)
            _finite(x, _describe(plan, ref))
            checked.add(ref.name)
        loaded.append(x)  # kernels may work in place
    raws.clear()  # drop the stored-dtype copies before the kernel allocates (the caller's list too)
    xs, base = loaded[: len(job.inputs)], (loaded[-1] if job.base else None)
    full_rows = None
    if job.vocab_rows is not None:
        # Vocabulary sizes differ: merge the common rows, keep the donor's rows beyond them.
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


def _merge_chunked(plan: MergePlan, job: TensorJob, raws: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise methods on large tensors: run the kernel chunk by chunk on cache-sized float32 pieces.

    Bit-identical to the whole-tensor path (each output entry sees the same operations), with inputs kept
    in their stored dtype: memory and bandwidth drop by the float32 copies that are never made.
    """
    refs = _refs(job)
    flats = [r.reshape(-1) for r in raws]
    out = torch.empty(job.out.shape, dtype=job.out.dtype, device=raws[0].device)
    flat = out.view(-1)
    n = flat.numel()
    mps = list(job.model_params)
    scaling = plan.recipe.depth_scaling
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        pieces = [r[start:end].to(torch.float32, copy=True) for r in flats]  # kernels work in place
        xs = pieces[: len(job.inputs)]
        base = pieces[-1] if job.base else None
        merged = plan.method.fn(xs, base, mps, job.global_params, job.ctx)
        if scaling is not None:
            merged = scaling.apply(merged, base, job.ctx.depth)
        if not math.isfinite(float(merged.sum())):
            # In an elementwise method any NaN/inf input reaches the output (0 * inf is NaN too), so
            # checking the output is enough; name the input responsible, if any.
            for ref, r in zip(refs, flats, strict=True):
                _finite(r[start:end].float(), _describe(plan, ref))
            _finite(merged, f"the merged tensor '{job.out.name}' (method {plan.method.name})")
        flat[start:end] = merged
    return out


def _merge_slerp_chunked(plan: MergePlan, job: TensorJob, raws: list[torch.Tensor]) -> torch.Tensor:
    """SLERP of large tensors: one pass for the norms and dot product (float64 partial sums), one pass that
    combines float32 chunks. Bit-identical to the whole-tensor kernel, without two float32 copies.

    A float32 output is combined in place, chunk by chunk; other output dtypes go through one float32
    chunk. The statistics pass doubles as the inputs' finiteness check, and bounds the output: with finite
    norms far below the float32 range no combination can overflow, so the chunks are checked only otherwise.
    """
    refs = _refs(job)
    flats = [r.reshape(-1) for r in raws]
    t = job.global_params.t
    na, nc, ac = geometric.slerp_stats(flats[0], flats[1])
    coef = geometric.coefficients_from_stats(t, na, nc, ac)
    if coef is not None and not math.isfinite(coef[0] + coef[1]):
        for ref, r in zip(refs, flats, strict=True):
            for start in range(0, r.numel(), CHUNK):
                _finite(r[start:start + CHUNK].float(), _describe(plan, ref))
    # |a_i| <= |a| and |c_i| <= |c|: no value a chunk computes exceeds |s_a| |a| + |s_c| |c| (slerp) or
    # 2 (|a| + |c|) (lerp) by more than rounding, so below the limit every output entry is finite.
    reach = 2 * (na + nc) if coef is None else abs(coef[0]) * na + abs(coef[1]) * nc
    check = not reach < _SAFE_FLOAT32
    out = torch.empty(job.out.shape, dtype=job.out.dtype, device=raws[0].device)
    flat = out.view(-1)
    n = flat.numel()
    step = min(n, CHUNK)
    f32 = {"dtype": torch.float32, "device": out.device}
    work = None if out.dtype == torch.float32 else torch.empty(step, **f32)  # a float32 output is its own
    other = None if flats[1].dtype == torch.float32 else torch.empty(step, **f32)
    what = f"the merged tensor '{job.out.name}' (method {plan.method.name})"
    for start in range(0, n, step):
        end = min(n, start + step)
        merged = flat[start:end] if work is None else work[: end - start]
        merged.copy_(flats[0][start:end])
        c = flats[1][start:end] if other is None else other[: end - start].copy_(flats[1][start:end])
        if coef is None:
            merged.lerp_(c, t)
        else:
            merged.mul_(coef[0]).add_(c, alpha=coef[1])
        if check and not math.isfinite(float(merged.sum())):
            _finite(merged, what)
        if work is not None:
            flat[start:end] = merged
    return out


def _merge_pipeline_chunked(plan: MergePlan, job: TensorJob, raws: list[torch.Tensor]) -> torch.Tensor:
    """Task-vector methods with whole-tensor selections (TIES, breadcrumbs) or seeded drops (DARE), chunked."""
    refs = _refs(job)
    flats = [r.reshape(-1) for r in raws]
    scaling = plan.recipe.depth_scaling
    what = f"the merged tensor '{job.out.name}' (method {plan.method.name})"

    def check(ts, base, start, end):
        if not all(math.isfinite(float(t.sum())) for t in (*ts, base)):
            for ref, r in zip(refs, flats, strict=True):
                _finite(r[start:end].float(), _describe(plan, ref))

    def post(merged, base):
        if scaling is not None:
            merged = scaling.apply(merged, base, job.ctx.depth)
        _finite(merged, what)
        return merged

    out = torch.empty(job.out.shape, dtype=job.out.dtype, device=raws[0].device)
    return chunked.run_chunked(plan.method.fn, flats, list(job.model_params), job.global_params, job.ctx, out,
                               post=post, check=check)


def run_merge(plan: MergePlan, out_dir: str | Path, *, device: str = "cpu", max_shard_bytes: int = 5 * 10**9,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Merge every tensor of ``plan`` into a new HF checkpoint at ``out_dir``; nothing is left there on error."""
    from tqdm.auto import tqdm

    from evomerge.util.memory import reuse_large_allocations

    reuse_large_allocations()
    # One core goes to the I/O thread: oversubscribed OpenMP workers spin at every barrier.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    writer = CheckpointWriter(out_dir, [j.out for j in plan.jobs], max_shard_bytes=max_shard_bytes,
                              overwrite=overwrite)
    jobs = plan.jobs
    try:
        # One I/O thread reads each job's inputs ahead and writes each result behind the arithmetic, in
        # that order; at most one result waits for its write, so memory grows by one output at most.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-io") as io:
            ahead = io.submit(load_inputs, plan, jobs[0]) if jobs else None
            written = None
            for i, job in enumerate(tqdm(jobs, desc=f"merge ({plan.method.name})", unit="tensor",
                                         disable=not progress)):
                raws = ahead.result()
                ahead = io.submit(load_inputs, plan, jobs[i + 1]) if i + 1 < len(jobs) else None
                out = merge_tensor(plan, job, device, raws)
                if written is not None:
                    written.result()
                written = io.submit(writer.write, job.out.name, out)
                del raws, out
            if written is not None:
                written.result()
        donor = plan.checkpoints[plan.donor]
        config = output_config(donor.config, dtype=plan.out_dtype, layer_origin=plan.layer_origin)
        return writer.finish(config, donor.path)
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)
