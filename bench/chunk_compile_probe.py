"""What fusing gains per chunk: eager torch vs torch.compile, single-threaded, in one run.

    python bench/chunk_compile_probe.py

First one TIES chunk of 2^18 entries for two bf16 experts (threshold masks, sign election, disjoint
mean, cast) written as one function, eager and compiled (inductor). Then the executor's own paths on a
4M-entry tensor: the eager chunk loops (kernels/chunked.py run_chunked, or the one-pass task arithmetic
chunk) against the fused kernels (run_fused: histogram passes, tie counts and combine), with the
compile latency of each method's kernels.
"""

from __future__ import annotations

import time

import torch

BLOCK = 1 << 18


def ties_chunk(x1, x2, b, t1, t2, w1, w2):
    b = b.float()
    d1 = x1.float() - b
    d2 = x2.float() - b
    d1 = d1 * (d1.abs() >= t1) * w1
    d2 = d2 * (d2.abs() >= t2) * w2
    sign = torch.where(d1 + d2 >= 0, 1.0, -1.0)
    m1 = d1 * sign > 0
    m2 = d2 * sign > 0
    divisor = m1 * w1 + m2 * w2
    return (b + (d1 * m1 + d2 * m2) / torch.where(divisor == 0, 1.0, divisor)).to(torch.bfloat16)


def per_chunk(fn, args, reps: int = 50) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - start) / reps


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x1, x2, b = (torch.randn(BLOCK, generator=g).to(torch.bfloat16) for _ in range(3))
    scalars = [torch.tensor(v) for v in (0.5, 0.5, 0.6, 0.4)]  # tensors: no recompilation per value
    args = (x1, x2, b, *scalars)
    start = time.perf_counter()
    compiled = torch.compile(ties_chunk, dynamic=False)
    compiled(*args)
    compile_s = time.perf_counter() - start
    eager_s, fused_s = per_chunk(ties_chunk, args), per_chunk(compiled, args)
    torch.testing.assert_close(compiled(*args).float(), ties_chunk(*args).float(), atol=1e-2, rtol=1e-2)
    gb = 3 * BLOCK * 2 / 1e9
    print(f"one TIES chunk of {BLOCK} entries, 2 bf16 experts + base, 1 thread (compile took {compile_s:.1f} s)")
    print(f"eager    {eager_s * 1e6:8.0f} us  {gb / eager_s:6.2f} GB/s of inputs")
    print(f"compiled {fused_s * 1e6:8.0f} us  {gb / fused_s:6.2f} GB/s of inputs  ({eager_s / fused_s:.1f}x eager)")
    executor_paths()


def eager_path(m, raws, mps, gp, ctx, out) -> None:
    """The executor's eager chunk loop: one-pass task arithmetic chunks, or run_chunked for pipelines."""
    from evomerge.kernels import chunked

    if not m.elementwise:
        chunked.run_chunked(m.fn, raws, mps, gp, ctx, out)
        return
    for a in range(0, out.numel(), chunked.BLOCK):
        b = a + chunked.BLOCK
        out[a:b] = m.fn([r[a:b].float() for r in raws[:-1]], raws[-1][a:b].float(), mps, gp, ctx)


def fused_path(m, raws, mps, gp, ctx, out) -> None:
    from evomerge.kernels import chunked

    chunked.run_fused(m.fn, raws, mps, gp, ctx, out)


def executor_paths(n: int = 1 << 22) -> None:
    """ns per entry of the executor's eager chunk loop and of its fused kernels, per method."""
    import os

    from evomerge.kernels import TensorContext, fused, get_method

    os.environ[fused.ENV] = "1"
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    raws = [(base.float() + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16) for _ in range(2)] + [base]
    out = torch.empty(n, dtype=torch.bfloat16)
    print(f"executor paths on {n} entries (2 bf16 experts + base, bf16 out), 1 thread, ns per entry:")
    for name in ("task_arithmetic", "ties", "dare_ties"):
        m = get_method(name)
        extra = {} if name == "task_arithmetic" else {"density": 0.5}
        args = (m, raws, [m.model_params(weight=0.5, **extra)] * 2, m.global_params(),
                TensorContext("w", seed=1, model_ids=("a", "b")), out)
        before = fused.stats["compile_s"]
        fused_path(*args)
        compile_s = fused.stats["compile_s"] - before
        eager_s, fused_s = per_chunk(eager_path, args, reps=3), per_chunk(fused_path, args, reps=3)
        print(f"  {name:16s} eager {eager_s / n * 1e9:6.2f}  fused {fused_s / n * 1e9:6.2f}  "
              f"({eager_s / fused_s:4.1f}x; compile {compile_s:4.1f} s)")


if __name__ == "__main__":
    main()
