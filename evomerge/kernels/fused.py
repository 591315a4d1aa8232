"""Fused chunk kernels compiled with torch.compile (inductor: C++ on CPU, triton on CUDA), and when to use them.

The eager chunked paths run every chunk as a dozen separate torch operations, each one a pass over
memory with its own temporaries. The kernels here write the same arithmetic once per kernel *structure*
(method shape, number of models, dtypes) and let inductor compile it into one loop per chunk that reads
the stored-dtype inputs and writes the output dtype. Numbers (weights, thresholds, positions, random
stream keys) are tensor arguments and sizes are dynamic, so new values and new chunk lengths reuse one
compiled kernel; kernels are cached per structure and thread count for the life of the process.

When: ``EVOMERGE_COMPILE=0`` never; ``=1`` for every tensor of at least MIN_NUMEL entries; unset (auto):
once a structure has spent AUTO_AFTER_S seconds in the eager chunk loops of this process, so a one-off
small merge never pays the compile latency (seconds) while long merges do; a process that declares it
will merge the same structures over and over (a search's evaluator, ``expect_repeats``) compiles each
structure at its first large tensor. Any compile or run failure disables compiled kernels for the process with one
warning, and the tensor is merged eagerly (``Unavailable``).

Agreement with eager: the kernels apply the eager operations in the same order, except that eager torch
computes ``a.add_(b, alpha=c)`` as a fused multiply-add on CPU while inductor rounds the product first,
so a float32 result can differ in its last bit (tests bound it). Signs of zeros may differ too. On CUDA,
triton's own contractions, approximate division and flushed subnormals are turned off (EAGER_NUMERICS).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from evomerge.kernels.select import hashed_uniform

log = logging.getLogger(__name__)

ENV = "EVOMERGE_COMPILE"
CHUNK = 1 << 20  # entries per fused-kernel call on CPU: one pass per chunk, so size only amortizes call overhead
CUDA_CHUNK = 1 << 23  # on CUDA: a launch costs more (at most 2^24, where bracket_body's float counts stay exact)
MIN_NUMEL = 1 << 16  # smaller tensors stay on the eager path
AUTO_AFTER_S = 10.0  # auto mode: eager seconds per structure before compiling it

stats = {"compile_s": 0.0, "kernels": 0, "calls": 0}  # compile latency (first calls), kernels, all calls
_kernels: dict[tuple, _Compiled] = {}
_eager_s: dict[tuple, float] = defaultdict(float)
_disabled: str | None = None  # why compiled kernels are off for this process
_repeats = False  # expect_repeats() was called: auto mode compiles at once


class Unavailable(RuntimeError):
    """A compiled kernel could not be built or run; the caller merges the tensor eagerly."""


def mode() -> str:
    """'0' (never), '1' (always for large tensors) or 'auto', from EVOMERGE_COMPILE."""
    value = os.environ.get(ENV, "").strip().lower()
    return {"0": "0", "false": "0", "off": "0", "1": "1", "true": "1", "on": "1"}.get(value, "auto")


def _supported() -> bool:
    """Whether torch.compile can be tried here (imports torch._dynamo, about a second, on first use)."""
    global _disabled
    if _disabled is None and not hasattr(torch, "compile"):
        _disabled = "this torch has no torch.compile"
    if _disabled is None:
        try:
            from torch import _dynamo

            if not _dynamo.is_dynamo_supported():
                _disabled = "torch.compile does not support this Python"
        except Exception as e:  # noqa: BLE001 - any import problem means: stay eager
            _disabled = f"torch._dynamo is unavailable ({e})"
    return _disabled is None


def chunk_size(device: torch.device) -> int:
    """Entries per fused-kernel call on ``device``."""
    return CUDA_CHUNK if device.type == "cuda" else CHUNK


def repeats_expected() -> bool:
    """Whether this process declared that it merges the same inputs over and over (``expect_repeats``)."""
    return _repeats


def expect_repeats() -> None:
    """Declare that this process merges the same kernel structures many times (a search's evaluator): in
    auto mode each structure is compiled at its first large tensor instead of after AUTO_AFTER_S seconds."""
    global _repeats
    _repeats = True


def wanted(structure: tuple, numel: int, device: torch.device) -> bool:
    """Whether to merge a tensor of ``numel`` entries with the compiled kernels of ``structure`` on ``device``
    (CPU or CUDA)."""
    m = mode()
    if m == "0" or device.type not in ("cpu", "cuda") or numel < MIN_NUMEL:
        return False
    if m == "auto" and not _repeats and _eager_s[structure] < AUTO_AFTER_S:
        return False
    return _supported()


def note_eager(structure: tuple, seconds: float) -> None:
    """Account eager chunk-loop time to ``structure`` (auto mode compiles once it reaches AUTO_AFTER_S)."""
    _eager_s[structure] += seconds


# Triton (CUDA) by default contracts a * b + c into one fused multiply-add, divides approximately and may
# flush subnormals to zero: any of them changes bits, and a contracted sum of weighted task vectors that
# cancels exactly (0.7 * 15u - 0.5 * 21u) gets another sign, so TIES elects another sign than eager.
# These inductor settings give eager's IEEE float32 arithmetic; those this torch lacks are left out.
EAGER_NUMERICS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                  "eager_numerics.disable_ftz": True}


def _compile_options(device_type: str, exact_casts: bool = False) -> dict:
    """torch.compile options for kernels on ``device_type``: eager numerics on CUDA; with ``exact_casts``,
    every cast to a lower precision rounds as written (inductor otherwise may keep the float32 value)."""
    if device_type != "cuda":
        return {"emulate_precision_casts": True} if exact_casts else {}
    from torch._inductor import config

    def known(key: str) -> bool:
        node = config
        for part in key.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
        return True

    return {k: v for k, v in EAGER_NUMERICS.items() if known(k)}


class _Compiled:
    """One compiled kernel; the first call compiles (timed into ``stats``), any failure disables fusing."""

    def __init__(self, key: tuple, body: Callable, device_type: str = "cpu", exact_casts: bool = False):
        # Dynamo keeps compiled variants, and its recompile limit, per code object: give every
        # structure's kernel a code object of its own rather than one template told apart by closures.
        code = body.__code__.replace(co_name=f"{body.__name__}_{len(_kernels)}")
        fresh = type(body)(code, body.__globals__, code.co_name, body.__defaults__, body.__closure__)
        options = _compile_options(device_type, exact_casts)
        self.key, self.ready = key, False
        self.fn = torch.compile(fresh, dynamic=True, fullgraph=True, **({"options": options} if options else {}))

    def __call__(self, *args):
        global _disabled
        if _disabled is not None:
            raise Unavailable(_disabled)
        start = time.perf_counter()
        try:
            out = self.fn(*args)
        except Exception as e:  # noqa: BLE001 - compiler missing, unsupported op, ...: merge eagerly
            _disabled = f"compiling {self.key[0]} failed: {type(e).__name__}: {str(e)[:300]}"
            log.warning("fused kernels off for this process, merging eagerly: %s", _disabled)
            raise Unavailable(_disabled) from e
        stats["calls"] += 1
        if not self.ready:
            self.ready = True
            stats["compile_s"] += time.perf_counter() - start
            stats["kernels"] += 1
        return out


def kernel(structure: tuple, build: Callable[[], Callable], device: torch.device | str = "cpu", *,
           exact_casts: bool = False) -> _Compiled:
    """The compiled kernel for ``structure`` on ``device``'s type (``build()`` returns its body on first use);
    ``exact_casts``: the body relies on a cast's rounding (see _compile_options)."""
    device_type = torch.device(device).type
    key = (structure, device_type, torch.get_num_threads())
    if key not in _kernels:
        _kernels[key] = _Compiled(key, build(), device_type, exact_casts)
    return _kernels[key]


def available() -> str | None:
    """None while compiled kernels may be used, else why not."""
    return None if _supported() else _disabled


# ---------------------------------------------------------------- kernel bodies
#
# Inputs: chunks of the n sources then the base, in their stored dtypes; ``fp`` float32 and ``ip`` int64
# parameter vectors; ``zero`` a 0-d float32 zero; ``dst`` the output chunk, written in place. Merging
# kernels return ``flag``, the sum of 0 * every input and result entry: 0 when all are finite, NaN
# otherwise (the caller then runs the exact checks that name the culprit).


def ta_body(n: int) -> Callable:
    """Task arithmetic in one pass: b (1 - c W) + sum_i (c w_i) x_i, then depth scaling.

    fp = [1 - c W, c w_1 .. c w_n, scale, scale_on].
    """

    def ta(*args):
        xs, b, fp, zero, dst = args[:n], args[n].float(), args[n + 1], args[n + 2], args[n + 3]
        out = b * fp[0]
        flag = b * zero
        for i, x in enumerate(xs):
            xf = x.float()
            flag = flag + xf * zero
            out = out + xf * fp[1 + i]
        out = torch.where(fp[n + 2] != 0, (out - b) * fp[n + 1] + b, out)
        dst.copy_(out)
        return (flag + out * zero).sum()

    return ta


def pipe_body(n: int, sparsify: str, sign: bool) -> Callable:
    """Task vectors sparsified per model, weighted, sign-elected (TIES) or summed, plus base and scaling.

    sparsify: 'none'; 'above' (keep |t| > thr: the caller splits chunks where ties stop being kept); 'topk'
    (keep |t| > thr, or == thr at positions < cut); 'band' (topk minus a second,
    inner topk: breadcrumbs); 'drop' (DARE: keep where the position's hashed uniform draw < p, divide by q).
    fp = [lam, divisor, scale, scale_on, normalize] + per model [w, thr, thr2, p, q];
    ip = [start] + per model [cut, cut2, k1, k2].
    """

    def pipe(*args):
        xs, b, fp, ip, zero, dst = args[:n], args[n].float(), args[n + 1], args[n + 2], args[n + 3], args[n + 4]
        pos = torch.arange(b.shape[0], device=b.device) + ip[0]
        flag = b * zero
        ts = []
        for i, x in enumerate(xs):
            f, j = 5 + 5 * i, 1 + 4 * i
            xf = x.float()
            flag = flag + xf * zero
            t = xf - b
            if sparsify == "above":
                t = t * (t.abs() > fp[f + 1])
            elif sparsify in ("topk", "band"):
                mag = t.abs()
                keep = (mag > fp[f + 1]) | ((mag == fp[f + 1]) & (pos < ip[j]))
                if sparsify == "band":
                    keep = keep & ~((mag > fp[f + 2]) | ((mag == fp[f + 2]) & (pos < ip[j + 1])))
                t = t * keep
            elif sparsify == "drop":
                u = hashed_uniform(pos & 0xFFFFFFFF, ip[j + 2], ip[j + 3])
                t = torch.where(u < fp[f + 3], t, 0.0) / fp[f + 4]
            ts.append(t * fp[f])
        if sign:
            total = ts[0]
            for t in ts[1:]:
                total = total + t
            elected = torch.where(total >= 0, 1.0, -1.0)
            masks = [t * elected > 0 for t in ts]
            out = ts[0] * masks[0]
            divisor = masks[0] * fp[5]
            for i in range(1, n):
                out = out + ts[i] * masks[i]
                divisor = divisor + masks[i] * fp[5 + 5 * i]
            out = torch.where(fp[4] != 0, out / torch.where(divisor == 0, 1.0, divisor), out)
        else:
            out = ts[0]
            for t in ts[1:]:
                out = out + t
            out = out / fp[1]
        merged = b + fp[0] * out
        merged = torch.where(fp[3] != 0, (merged - b) * fp[2] + b, merged)
        dst.copy_(merged)
        return (flag + merged * zero).sum()

    return pipe


def magnitude_bits_body(n: int, models: tuple[int, ...]) -> Callable:
    """|x_i - b| as its float32 bit pattern (int32) for the listed models: the caller shifts and histograms
    the top 16 bits (StreamTopK's first pass). Integer ops after a bitcast do not vectorize in inductor's
    CPU code, so the kernel stops at the (free) bitcast."""

    def magnitude_bits(*args):
        b = args[n].float()
        return tuple((args[i].float() - b).abs().view(torch.int32) for i in models)

    return magnitude_bits


def bracket_body(n: int, owners: tuple[int, ...]) -> Callable:
    """One counting pass for sampled brackets (kernels/bracket.py): for each selection s (``owners[s]``: its
    model, at most 8 selections) with bracket ``bounds[s] = (lo, hi)`` (float32 [S, 2]), the counts of
    |x_i - b| above hi, equal to hi, equal to lo and below lo (int64 [S, 4]), and one uint8 per entry
    whose bit s says that the entry lies strictly between lo and hi for selection s.

    Counts are float sums of 1.0 / 0.0 (exact below 2^24 entries per call) and the flags integer selects:
    inductor's CPU code vectorizes neither boolean reductions nor boolean stores."""

    def bracket(*args):
        b, bounds = args[n].float(), args[n + 1]
        counts = []
        flags = None
        for s, i in enumerate(owners):
            v = (args[i].float() - b).abs()
            lo, hi = bounds[s, 0], bounds[s, 1]
            counts.append(torch.stack([torch.where(v > hi, 1.0, 0.0).sum(), torch.where(v == hi, 1.0, 0.0).sum(),
                                       torch.where(v == lo, 1.0, 0.0).sum(), torch.where(v < lo, 1.0, 0.0).sum()]))
            bit = torch.where((v > lo) & (v < hi), 1 << s, 0)
            flags = bit if flags is None else flags + bit
        return torch.stack(counts).to(torch.int64), flags.to(torch.uint8)

    return bracket


SMALLEST_NORMAL = 2.0 ** -126
BF16_ULP_SUBNORMAL = 2.0 ** -133
BF16_MAX = 3.3895313892515355e38


def histogram_keys_body(n: int, models: tuple[int, ...]) -> Callable:
    """For each listed model and v = |x_i - b| (NaN as +inf): v truncated to bfloat16 (its top 16 bits), a
    bfloat16 mark that is 2.0 (bit pattern IMPURE_MARK) where v is not exactly a bfloat16 value and 0
    elsewhere, how many are not, and the largest v (float32 0-d each): kernels/histogram.py's input.

    Bit operations do not vectorize here, so the truncation is a rounding to nearest, stepped one bfloat16
    down where it rounded up: r (1 - 2^-8) rounds to r's predecessor for a normal r above the smallest
    normal (r's 8 significant bits times 8 are exact in float32); subnormals step by their fixed ulp.
    Needs exact casts (kernel(..., exact_casts=True)).
    """

    def keys(*args):
        b = args[n].float()
        out = []
        for i in models:
            v = (args[i].float() - b).abs()
            v = torch.where(v == v, v, float("inf"))
            rounded = v.to(torch.bfloat16).float()
            below = torch.where(rounded > SMALLEST_NORMAL, rounded * (1.0 - 2.0 ** -8), rounded - BF16_ULP_SUBNORMAL)
            below = torch.where(rounded == float("inf"), BF16_MAX, below)
            key = torch.where(rounded > v, below, rounded).to(torch.bfloat16)
            exact = rounded == v
            out += [key, torch.where(exact, 0.0, 2.0).to(torch.bfloat16), torch.where(exact, 0.0, 1.0).sum(),
                    v.max()]
        return tuple(out)

    return keys


LOW_BINS = 1 << 16
SPREAD = 1 << 10  # entries outside the bucket go to one of SPREAD spare bins (by their scaled offset)


def low_keys_body(n: int, models: tuple[int, ...]) -> Callable:
    """StreamTopK's second pass: for each selection (``models``: its model), the low 16 bits of |x_i - b|
    where that value lies in the selection's bucket, else one of SPREAD spare bins from LOW_BINS on (spread,
    so the histogram loop does not serialize on one counter).

    Computed without bit operations (which do not vectorize here): inside a bucket [lo, hi) all values
    share one exponent, so (v - lo) / ulp, with the power-of-two 1 / ulp applied as two exact factors,
    is exactly the low 16 bits. ``ranges`` float32 [S, 4] = (lo, hi, f1, f2) per selection.
    """

    def low(*args):
        b, ranges = args[n].float(), args[n + 1]
        out = []
        for s, i in enumerate(models):
            v = (args[i].float() - b).abs()
            inside = (v >= ranges[s, 0]) & (v < ranges[s, 1])
            key = ((v - ranges[s, 0]) * ranges[s, 2] * ranges[s, 3]).to(torch.int32)  # outside: any int
            out.append(torch.where(inside, key, (key & (SPREAD - 1)) + LOW_BINS))
        return tuple(out)

    return low


TIE_BLOCK = 1 << 12  # tie counts come per block of this many entries, so finding the j-th tie is cheap


def tie_count_body(n: int, models: tuple[int, ...]) -> Callable:
    """How many entries of |x_i - b| equal each selection's threshold (``thr`` float32 [S]), per block:
    inputs are [blocks, TIE_BLOCK] views; returns int64 [S, blocks]."""

    def ties(*args):
        b, thr = args[n].float(), args[n + 1]
        return torch.stack([((args[i].float() - b).abs() == thr[s]).sum(dim=1) for s, i in enumerate(models)])

    return ties
