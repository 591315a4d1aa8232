"""C kernels for the CPU's hottest merges: top-k (TIES) selections and task arithmetic, one pass each.

kernels/native_merge.c:
- ``topk_merge`` sparsifies, elects signs and combines a tensor in one pass that also places where the kept
  ties of each threshold stop (the lowest positions win), counting them as it goes: the compiled kernels
  (kernels/fused.py) need a tie-counting pass before the combining one and a kernel call per piece between
  cuts;
- ``ta_merge``: task arithmetic's one-pass form, without the per-call cost of a compiled kernel;
- ``observe_brackets``: the counting pass of sampled brackets (kernels/bracket.py), gathering the entries
  inside without a position mask.
Their arithmetic is the compiled kernels', in the same order, so results agree bit for bit.

The source is compiled on first use with the C compiler inductor uses too (``CC``, else cc or gcc; for
this CPU: -march=native) into a cache keyed by the source, the flags and the CPU (``EVOMERGE_CACHE``,
else ~/.cache/evomerge). Calls release the GIL: a tensor of at least 2 x MIN_PER_THREAD entries is split
over torch.get_num_threads() threads (``topk_merge`` says how they agree on the ties). They run where the
compiled kernels would (not under ``EVOMERGE_COMPILE=0``), and TIES at any tensor size. If the compiler is
missing or fails, or ``EVOMERGE_NATIVE=0``, ``available()`` says why and the compiled kernels are used.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "EVOMERGE_NATIVE"
SOURCE = Path(__file__).with_name("native_merge.c")
FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
MIN_PER_THREAD = 1 << 21  # entries per thread at least: smaller tensors run on the calling thread (on the
# 2-core bench machine, splitting 884K-entry tensors over 2 threads made in-memory TIES merges slower)
ALL_TIES = 1 << 62  # a backward range's ``wanted`` when it drops every tie
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

stats = {"calls": 0}  # calls of the native kernels (merges and counting passes) in this process
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why_not: str | None = None
_pool: ThreadPoolExecutor | None = None


def _cpu_key() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def cache_dir() -> Path:
    """Where built libraries are kept: $EVOMERGE_CACHE/native, else $XDG_CACHE_HOME (or ~/.cache)/evomerge/native."""
    root = os.environ.get("EVOMERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evomerge")
    return Path(root) / "native"


def _compile(target: Path) -> None:
    """Build the shared library at ``target`` (atomically: a concurrent build never leaves half a file)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (set CC, or install cc/gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        errors = ""
        for arch in (["-march=native"], []):  # not every compiler and CPU knows -march=native
            run = subprocess.run([compiler, *FLAGS, *arch, str(SOURCE), "-o", str(built)],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                os.replace(built, target)
                return
            errors = run.stderr.strip()[-500:]
        raise OSError(f"{compiler} failed: {errors}")


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, compiled on first use; None if it cannot be (``available()`` says why)."""
    global _lib, _why_not
    with _lock:
        if _lib is not None or _why_not is not None:
            return _lib
        digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()
        target = cache_dir() / f"native_merge-{digest[:16]}.so"
        try:
            if not target.exists():
                _compile(target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as e:
            _why_not = f"the native kernels are unavailable: {e}"
            log.info("%s; using the compiled torch kernels", _why_not)
            return None
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        lib.topk_merge.restype = i64
        lib.topk_merge.argtypes = [i64, i32, ptr, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, i32, i32]
        lib.count_ties.restype = i64
        lib.count_ties.argtypes = [i64, i32, ptr, ptr, ptr, ptr, ptr]
        lib.histogram_keys.restype = i64
        lib.histogram_keys.argtypes = [i64, i32, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr]
        lib.ta_merge.restype = i64
        lib.ta_merge.argtypes = [i64, i32, ptr, ptr, ptr, i32, ptr, ctypes.c_float, i32]
        lib.observe_brackets.restype = i64
        lib.observe_brackets.argtypes = [i64, i32, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        _lib = lib
        return _lib


def available() -> str | None:
    """None when the native kernels can be used, else why not."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "off"):
        return f"turned off by {ENV}=0"
    return None if library() is not None else _why_not


def supports(raws: list[torch.Tensor], out: torch.Tensor | None = None) -> bool:
    """Whether the kernels take these flat inputs and output (CPU, contiguous, float32/bfloat16/float16)."""
    tensors = (*raws, out) if out is not None else raws
    return all(t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous() for t in tensors)


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_CPUS, thread_name_prefix="evomerge-native")
        return _pool


def _loaded() -> ctypes.CDLL:
    """The library, for a call (counted in ``stats``); raises if it cannot be had."""
    lib = library()
    if lib is None:
        raise RuntimeError(_why_not)
    stats["calls"] += 1
    return lib


def _pointers(tensors: list[torch.Tensor], start: int = 0) -> ctypes.Array:
    """The addresses of entry ``start`` of each flat tensor, as a C array."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() + start * t.element_size() for t in tensors])


def _dtypes(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_int32 * len(tensors))(*[DTYPES[t.dtype] for t in tensors])


def _checked(code: int, name: str) -> int:
    if code < 0:
        raise MemoryError(f"{name}: out of memory for its block buffers")
    return code


def _ranges(n: int) -> list[int]:
    """Bounds of the ranges [bounds[p], bounds[p + 1]) a tensor of ``n`` entries is split into, one per thread."""
    parts = max(1, min(torch.get_num_threads(), _CPUS, n // MIN_PER_THREAD))
    return [n * p // parts for p in range(parts + 1)]


def topk_merge(raws: list[torch.Tensor], out: torch.Tensor, weights: list[float], thresholds: list[float],
               wanted: list[int], ties: list[int], fp: list[float], sign: bool) -> list[int]:
    """Merge flat ``raws`` (sources, then the base) into flat ``out``; returns the position of the first
    non-finite result of each range of entries that has one (a range per thread).

    Model i keeps |t| > thresholds[i] and the first wanted[i] of the ties[i] entries equal to it (a
    selection keeping every tie passes the float32 just below its threshold and wanted 0). ``fp`` = [lam,
    divisor, scale, scale_on, normalize] as in fused.pipe_body. Split over threads, the last range is
    walked from its end, dropping the ties past the last kept one, so two threads need no count of the ties
    before a range; more threads count them for the middle ranges."""
    lib = _loaded()
    m = len(raws) - 1
    backward = [ALL_TIES if k == 0 else t - k for k, t in zip(wanted, ties, strict=True)]
    dts = _dtypes(raws)
    w = (ctypes.c_float * m)(*weights)
    thr = (ctypes.c_float * m)(*thresholds)
    params = (ctypes.c_float * 5)(*fp)
    bounds = _ranges(out.numel())
    parts = len(bounds) - 1
    counts_of = (ctypes.c_int64 * m)

    def count(p: int) -> list[int]:  # ties of each counting model in range p
        found = counts_of()
        _checked(lib.count_ties(bounds[p + 1] - bounds[p], m, _pointers(raws, bounds[p]), dts, thr,
                                counts_of(*wanted), found), "count_ties")
        return list(found)

    def merge(p: int, before: list) -> list[int]:
        last = p == parts - 1 and p > 0
        seen = [sum(c) for c in zip(*[f.result() for f in before], strict=True)] if before else [0] * m
        a, b = bounds[p], bounds[p + 1]
        first = _checked(lib.topk_merge(b - a, m, _pointers(raws, a), dts, _pointers([out], a)[0],
                                        DTYPES[out.dtype], params, w, thr, counts_of(*(backward if last else wanted)),
                                        counts_of(*seen), int(sign), int(last)), "topk_merge")
        return [a + first - 1] if first else []

    if parts == 1:
        return merge(0, [])
    pool = _threads()
    # Counts go first in the queue, so a merge waiting for them never holds back a worker they need.
    counts = [pool.submit(count, p) for p in range(parts - 2)] if any(wanted) else []
    merges = [pool.submit(merge, p, counts[:p] if p < parts - 1 else []) for p in range(1, parts)]
    return merge(0, []) + [pos for f in merges for pos in f.result()]  # the first range on this thread


def histogram_keys(raws: list[torch.Tensor], models: tuple[int, ...]) -> list:
    """fused.histogram_keys_body's outputs over flat ``raws`` (sources, then the base; at most 64 models),
    as HistogramBuilder.add takes them: for each listed source, int16 keys, int16 marks, how many
    magnitudes are impure, and the largest magnitude."""
    lib = _loaded()
    m, n, count = len(raws) - 1, raws[-1].numel(), len(models)
    if count > 64:
        raise ValueError(f"histogram_keys takes at most 64 sources at once, got {count}")
    keys = [torch.empty(n, dtype=torch.int16) for _ in models]
    marks = [torch.empty(n, dtype=torch.int16) for _ in models]
    impure = (ctypes.c_int64 * count)()
    largest = (ctypes.c_float * count)()
    _checked(lib.histogram_keys(n, m, _pointers(raws), _dtypes(raws), count, (ctypes.c_int32 * count)(*models),
                                _pointers(keys), _pointers(marks), impure, largest), "histogram_keys")
    return [x for j in range(count) for x in (keys[j], marks[j], impure[j], largest[j])]


def ta_merge(raws: list[torch.Tensor], out: torch.Tensor, coefficients: list[float], scale: float) -> list[int]:
    """Task arithmetic as fused.ta_body computes it, into flat ``out``: b c_0 + sum_i c_i x_i, then depth
    scaling by ``scale``; split over threads for tensors of at least 2 x MIN_PER_THREAD entries. Returns
    the position of the first non-finite result of each range that has one."""
    lib = _loaded()
    m = len(raws) - 1
    dts = _dtypes(raws)
    coef = (ctypes.c_float * (m + 1))(*coefficients)
    bounds = _ranges(out.numel())

    def merge(p: int) -> list[int]:
        a, b = bounds[p], bounds[p + 1]
        first = _checked(lib.ta_merge(b - a, m, _pointers(raws, a), dts, _pointers([out], a)[0], DTYPES[out.dtype],
                                      coef, scale, int(scale != 1.0)), "ta_merge")
        return [a + first - 1] if first else []

    rest = [_threads().submit(merge, p) for p in range(1, len(bounds) - 1)]
    return merge(0) + [pos for f in rest for pos in f.result()]


def observe_brackets(raws: list[torch.Tensor], owners: list[int], bounds: list[tuple[float, float]]) \
        -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The counting pass of brackets (kernels/bracket.py) over flat ``raws`` (sources, then the base): for
    bracket s of source owners[s], (counts [above hi, equal hi, equal lo, below lo], positions, values) of
    |x - b| as ``Bracket.add`` takes them. The room for entries inside is guessed, and made exact by a
    second pass where the guess was short."""
    lib = _loaded()
    m, n, count = len(raws) - 1, raws[-1].numel(), len(owners)
    c_int64, c_float = ctypes.c_int64, ctypes.c_float
    dts, ptrs = _dtypes(raws), _pointers(raws)
    who = (ctypes.c_int32 * count)(*owners)
    lo = (c_float * count)(*[b[0] for b in bounds])
    hi = (c_float * count)(*[b[1] for b in bounds])
    room = [max(4096, n // 16)] * count
    while True:
        positions = [torch.empty(c, dtype=torch.int64) for c in room]
        values = [torch.empty(c, dtype=torch.float32) for c in room]
        counts = torch.zeros(count, 4, dtype=torch.int64)
        found = (c_int64 * count)()
        _checked(lib.observe_brackets(n, m, ptrs, dts, count, who, lo, hi, counts.data_ptr(), _pointers(positions),
                                      _pointers(values), (c_int64 * count)(*room), found), "observe_brackets")
        if all(f < r for f, r in zip(found, room, strict=True)):
            return [(counts[s], positions[s][: found[s]], values[s][: found[s]]) for s in range(count)]
        room = [max(f + 1, r) for f, r in zip(found, room, strict=True)]  # + 1: the kernel writes one past
