"""How much a fused chunk kernel would gain: one TIES chunk, eager torch vs torch.compile, in one run.

    python bench/chunk_compile_probe.py

The merge executor runs each 2^18-entry chunk as ~15 separate eager torch operations; this times the
same arithmetic for two bf16 experts (threshold masks, sign election, disjoint mean, cast) written as one
function, eager and compiled (inductor), single-threaded, and prints the ratio. It measures the headroom
of fusing; the executor does not use compiled kernels yet.
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


if __name__ == "__main__":
    main()
