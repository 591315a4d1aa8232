"""Merge throughput against a plain memory copy of the same bytes, and peak memory, in one run.

    python bench/merge_throughput.py [--device cpu|cuda] [--methods task_arithmetic ties dare_ties]
                                     [--modes eager compiled] [--runs 3]

Builds (once, cached under bench/.cache) a 135M-parameter Llama with SmolLM2-135M's shapes (random
bf16 weights: throughput does not depend on the values) and two experts. Each (method, mode) runs in its
own process, so peak RSS and compile latency are its own: eager (EVOMERGE_COMPILE=0) and compiled
(EVOMERGE_COMPILE=1: fused kernels; TIES on the CPU: the native top-k kernel, kernels/native.py). A process merges --runs times: the first run includes compiling
(reported separately as the time of the kernels' first calls), the warm time is the best of the others.
Two paths per (method, mode):

- file -> file: ``run_merge`` from the checkpoint files (page-cached) to a new checkpoint on disk, the
  fsync included: what ``evomerge merge`` does.
- in memory: the path a search takes to materialize a candidate into a resident model
  (search/evaluator.py): the sources are resident tensors on the device, every run's plan is built
  through one CheckpointCache (as the evaluator's are), and ``merge_tensor`` runs over all jobs, keeping
  every output tensor in memory; nothing is written. Timed twice: with run_merge's compute threads (one
  core less than the process has, 'in-mem Nt') and with every core, as the evaluator merges (and as the
  memory copy runs).

Densities change from run to run (DENSITIES), as a search's candidates do, so nothing a run settles for
its own densities can serve the next. What does carry over is what a search keeps: the in-memory path
declares repeated merges (fused.expect_repeats, as the evaluator does), so TIES settles its selections
from magnitude histograms of the task vectors (kernels/histogram.py), built by the first run and kept
with the open checkpoints. The file -> file runs build a fresh plan each time, like separate
``evomerge merge`` commands, and settle them from sampled brackets.

Prints GB of input weights per second, its ratio to a memory copy of the same number of bytes measured
in the same process (on CUDA: a device-to-device copy), and peak RSS against one model's size. The
first row does the same reads and writes as a file -> file merge with no arithmetic: the floor the file
I/O sets. On CUDA every timing synchronizes the device before it starts and before it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(__file__).parent / ".cache" / "smollm2-shape"
DENSITIES = (0.5, 0.4, 0.6, 0.45, 0.55)  # one per run, in turn (methods with a density)
SHAPE = dict(vocab=49152, hidden=576, inter=1536, layers=30, heads=9, kv=3)


def build(root: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    paths = {k: root / k for k in ("base", "e1", "e2")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    s = SHAPE
    head_dim = s["hidden"] // s["heads"]
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (s["vocab"], s["hidden"]), "model.norm.weight": (s["hidden"],)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (s["hidden"], s["hidden"]),
                   p + "self_attn.k_proj.weight": (s["kv"] * head_dim, s["hidden"]),
                   p + "self_attn.v_proj.weight": (s["kv"] * head_dim, s["hidden"]),
                   p + "self_attn.o_proj.weight": (s["hidden"], s["hidden"]),
                   p + "mlp.gate_proj.weight": (s["inter"], s["hidden"]),
                   p + "mlp.up_proj.weight": (s["inter"], s["hidden"]),
                   p + "mlp.down_proj.weight": (s["hidden"], s["inter"]),
                   p + "input_layernorm.weight": (s["hidden"],),
                   p + "post_attention_layernorm.weight": (s["hidden"],)}
    base = {n: (torch.randn(sh, generator=g) * 0.02).to(torch.bfloat16) for n, sh in shapes.items()}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
              "intermediate_size": s["inter"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
              "num_key_value_heads": s["kv"], "vocab_size": s["vocab"], "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "max_position_embeddings": 2048}
    for k, p in paths.items():
        p.mkdir(parents=True, exist_ok=True)
        sd = base if k == "base" else {n: (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(torch.bfloat16)
                                       for n, t in base.items()}
        save_file(sd, p / "model.safetensors", metadata={"format": "pt"})
        (p / "config.json").write_text(json.dumps(config))
    return paths


def one(method: str, device: str, runs: int) -> dict:
    """Merge ``runs`` times in this process (the first pays any compile latency); report rates, compile
    time and this process's peak RSS."""
    import psutil

    from evomerge.kernels import fused
    from evomerge.merge import run_merge
    from evomerge.plan import build_plan
    from evomerge.recipe import parse_recipe

    if fused.mode() == "1":  # the compiler's own modules (~200 MB) count as libraries, like torch
        import torch._inductor.compile_fx  # noqa: F401

    paths = build(CACHE)

    def recipe(run: int):
        params = {"weight": 0.5}
        if method not in ("task_arithmetic", "linear"):
            params["density"] = DENSITIES[run % len(DENSITIES)]
        return parse_recipe({"method": method, "base": str(paths["base"]),
                             "sources": [{"model": str(paths[k]), "parameters": params} for k in ("e1", "e2")]})

    rss_before = psutil.Process().memory_info().rss
    seconds, peaks = [], []
    for run in range(runs):
        with tempfile.TemporaryDirectory(dir=CACHE.parent) as tmp:
            sync(device)
            start = time.perf_counter()
            plan = build_plan(recipe(run), CACHE)  # a fresh plan, as a new `evomerge merge` makes
            run_merge(plan, Path(tmp) / "out", device=device, progress=False)
            sync(device)
            seconds.append(time.perf_counter() - start)
            plan.close()
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    compile_s = fused.stats["compile_s"]
    import torch

    cores = torch.get_num_threads()
    memory = {}  # after the file merges: resident sources would count in their RSS
    for threads in sorted({max(1, cores - 1), cores}):
        before = fused.stats["compile_s"]
        timed = in_memory(recipe, device, runs, threads)
        memory[threads] = {"first": timed[0], "warm": min(timed[1:] or timed),
                           "compile": fused.stats["compile_s"] - before}
    copy = memcopy_rate(plan.input_bytes, device)  # same process, right after the merges (after peak RSS)
    largest = max(j.out.nbytes // j.out.dtype.itemsize * 4 for j in plan.jobs)  # float32 bytes
    return {"method": method, "first": seconds[0], "warm": min(seconds[1:] or seconds),
            "compile": compile_s, "kernels": fused.stats["kernels"],
            "memory": memory,
            "input_bytes": plan.input_bytes, "model_bytes": plan.checkpoints[0].nbytes, "peak_rss": peaks[0],
            "peak_rss_all": peaks[-1], "rss_before": rss_before, "bound": (len(plan.checkpoints) + 2) * largest, "copy": copy}


def in_memory(recipe, device: str, runs: int, threads: int) -> list[float]:
    """Seconds per in-memory merge (module docstring) with ``threads`` torch threads: resident sources,
    outputs kept, no files written. With run_merge's thread count, the two paths differ in their I/O only;
    with every core, as a search's evaluator merges (on a loaded machine, OpenMP threads on every core spin
    at each barrier and time the machine's load instead of the merge)."""
    import torch

    from evomerge.checkpoint.reader import CheckpointCache
    from evomerge.kernels import fused
    from evomerge.merge import load_inputs, merge_tensor
    from evomerge.plan import build_plan

    fused.expect_repeats()  # as a search's evaluator declares (compile mode is set by EVOMERGE_COMPILE here)
    checkpoints = CheckpointCache()
    plans = [build_plan(recipe(run), CACHE, checkpoints=checkpoints) for run in range(runs)]
    resident = [[t.to(device) for t in load_inputs(plans[0], job)] for job in plans[0].jobs]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds = []
    try:
        for plan in plans:
            sync(device)
            start = time.perf_counter()
            # a fresh list per job: merge_tensor may drop its inputs from the list it is given
            outputs = {job.out.name: merge_tensor(plan, job, device, list(raws))
                       for job, raws in zip(plan.jobs, resident, strict=True)}
            sync(device)
            seconds.append(time.perf_counter() - start)
            del outputs
    finally:
        torch.set_num_threads(previous)
        checkpoints.close()
    return seconds


def sync(device: str) -> None:
    """Wait for queued device work (CUDA), so a timing covers it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def io_floor(device: str, runs: int) -> dict:
    """The same reads and writes as a merge, with the same reader/writer overlap, and no arithmetic."""
    from concurrent.futures import ThreadPoolExecutor

    from evomerge.checkpoint.writer import CheckpointWriter
    from evomerge.merge import load_inputs
    from evomerge.plan import build_plan
    from evomerge.recipe import parse_recipe

    paths = build(CACHE)
    recipe = parse_recipe({"method": "task_arithmetic", "base": str(paths["base"]),
                           "sources": [{"model": str(paths[k])} for k in ("e1", "e2")]})
    plan = build_plan(recipe, CACHE)
    seconds = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir=CACHE.parent) as tmp, ThreadPoolExecutor(1) as io:
            start = time.perf_counter()
            writer = CheckpointWriter(Path(tmp) / "out", [j.out for j in plan.jobs])
            jobs, ahead, written = plan.jobs, io.submit(load_inputs, plan, plan.jobs[0]), None
            for i, job in enumerate(jobs):
                raws = ahead.result()
                ahead = io.submit(load_inputs, plan, jobs[i + 1]) if i + 1 < len(jobs) else None
                if written is not None:
                    written.result()
                written = io.submit(writer.write, job.out.name, raws[-1])
            written.result()
            writer.finish({}, None)
            seconds.append(time.perf_counter() - start)
    return {"method": "(read+write only)", "first": seconds[0], "warm": min(seconds[1:] or seconds),
            "compile": 0.0, "kernels": 0, "input_bytes": plan.input_bytes, "copy": memcopy_rate(plan.input_bytes, device)}


def memcopy_rate(nbytes: int, device: str, repeats: int = 10) -> float:
    """Bytes per second of one copy of ``nbytes`` from a buffer to another on ``device`` (best of
    ``repeats``: on a shared machine one copy's rate varies by tens of percent): host memory on CPU,
    device-to-device on CUDA."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def copy_kind(device: str) -> str:
    return "a device-to-device copy (CUDA)" if device.startswith("cuda") else "a host memory copy"


MODES = {"eager": "0", "compiled": "1"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties"])
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["eager", "compiled"],
                    help="eager: EVOMERGE_COMPILE=0; compiled: EVOMERGE_COMPILE=1 (fused kernels)")
    ap.add_argument("--runs", type=int, default=5, help="merges per process: the first, then warm ones")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        row = io_floor(args.device, args.runs) if args.one == "io" else one(args.one, args.device, args.runs)
        print(json.dumps(row))
        return
    for p in build(CACHE).values():  # page cache warm: measure merging, not the disk
        with open(p / "model.safetensors", "rb") as f:
            while f.read(1 << 24):
                pass
    load = os.getloadavg()
    rows = []
    for m, mode in [("io", "eager")] + [(m, mode) for m in args.methods for mode in args.modes]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "EVOMERGE_COMPILE": MODES[mode]}
        out = subprocess.run([sys.executable, __file__, "--one", m, "--device", args.device, "--runs", str(args.runs)],
                             check=True, capture_output=True, text=True, env=env)
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "mode": mode if m != "io" else "-"})
    r0 = rows[1] if len(rows) > 1 else rows[0]
    print(f"device {args.device}; load average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}; "
          f"{args.runs} merges per process and path: 'first' includes compiling the fused kernels "
          f"('compile', timed on their first calls), 'warm' is the best of the others; each process times "
          f"{copy_kind(args.device)} of the same {r0['input_bytes'] / 1e9:.2f} GB right after merging (best of 10)")
    print("paths: file->file = run_merge from page-cached checkpoints to a new checkpoint (fsync included); "
          "in-mem Nt = merge_tensor over all jobs from resident sources, outputs kept, no writes (a search's "
          "materialization), with N torch threads: run_merge's compute threads, and every core (as the "
          "evaluator merges and the copy runs)")
    print(f"densities (ties, dare_ties) change every run: {', '.join(map(str, DENSITIES[:args.runs]))}; file->file "
          "builds a fresh plan per run; in-memory plans share one CheckpointCache and declare repeated merges, so "
          "TIES's magnitude histograms are built in its first run and kept, as a search keeps them")
    if "model_bytes" in r0:
        print(f"one model: {r0['model_bytes'] / 1e6:.0f} MB (bf16, 135M parameters); inputs: base + 2 experts; "
              f"(sources + 2) x largest tensor in float32: {r0['bound'] / 1e6:.0f} MB")
    print("merge RSS = peak RSS during the first merge minus the process's RSS before planning (interpreter, "
          "torch, libraries, and for compiled runs the compiler); 'after all' = the same after every merge")
    print(f"{'method':18s} {'mode':8s} {'path':10s} {'first s':>7s} {'compile s':>9s} {'warm s':>7s} {'GB/s':>6s} "
          f"{'copy GB/s':>9s} {'vs copy':>7s} {'peak RSS':>8s} {'merge RSS':>9s} {'merge RSS/model':>15s} "
          f"{'after all':>9s}")
    for r in rows:
        rate = r["input_bytes"] / r["warm"]
        line = (f"{r['method']:18s} {r['mode']:8s} {'file->file':10s} {r['first']:7.2f} {r['compile']:9.2f} "
                f"{r['warm']:7.3f} {rate / 1e9:6.2f} {r['copy'] / 1e9:9.2f} {rate / r['copy']:7.1%}")
        if "peak_rss" in r:
            merge_rss = r["peak_rss"] - r["rss_before"]
            line += (f" {r['peak_rss'] / 1e6:6.0f}MB {merge_rss / 1e6:7.0f}MB "
                     f"{merge_rss / r['model_bytes']:15.2f} {(r['peak_rss_all'] - r['rss_before']) / r['model_bytes']:9.2f}")
        print(line)
        for threads, mem in sorted((int(t), m) for t, m in r.get("memory", {}).items()):
            rate = r["input_bytes"] / mem["warm"]
            print(f"{r['method']:18s} {r['mode']:8s} {f'in-mem {threads}t':10s} {mem['first']:7.2f} "
                  f"{mem['compile']:9.2f} {mem['warm']:7.3f} {rate / 1e9:6.2f} {r['copy'] / 1e9:9.2f} "
                  f"{rate / r['copy']:7.1%}")


if __name__ == "__main__":
    main()
