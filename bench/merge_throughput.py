"""Merge throughput against a plain memory copy of the same bytes, and peak memory, in one run.

    python bench/merge_throughput.py [--device cpu|cuda] [--methods task_arithmetic ties dare_ties]

Builds (once, cached under bench/.cache) a 135M-parameter Llama with SmolLM2-135M's shapes (random
bf16 weights: throughput does not depend on the values) and two experts. Each method runs in its own
process so peak RSS is its own. Prints GB of input weights per second, its ratio to a memory copy of
the same number of bytes measured in the same run, and peak RSS against one model's size.
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


def one(method: str, device: str) -> dict:
    """Run one merge in this process; report its rate and this process's peak RSS."""
    import psutil

    from evomerge.merge import run_merge
    from evomerge.plan import build_plan
    from evomerge.recipe import parse_recipe

    paths = build(CACHE)
    density = "" if method in ("task_arithmetic", "linear") else ", density: 0.5"
    recipe = parse_recipe({"method": method, "base": str(paths["base"]),
                           "sources": [{"model": str(paths[k]), "parameters": {"weight": 0.5}} for k in ("e1", "e2")]}
                          if not density else
                          {"method": method, "base": str(paths["base"]),
                           "sources": [{"model": str(paths[k]), "parameters": {"weight": 0.5, "density": 0.5}}
                                       for k in ("e1", "e2")]})
    rss_before = psutil.Process().memory_info().rss
    plan = build_plan(recipe, CACHE)
    with tempfile.TemporaryDirectory(dir=CACHE.parent) as tmp:
        start = time.perf_counter()
        run_merge(plan, Path(tmp) / "out", device=device, progress=False)
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    copy = memcopy_rate(plan.input_bytes, device)  # same process, right after the merge (after peak RSS)
    largest = max(j.out.nbytes // j.out.dtype.itemsize * 4 for j in plan.jobs)  # float32 bytes
    return {"method": method, "seconds": seconds, "input_bytes": plan.input_bytes,
            "model_bytes": plan.checkpoints[0].nbytes, "peak_rss": peak, "rss_before": rss_before,
            "bound": (len(plan.checkpoints) + 2) * largest, "copy": copy}


def memcopy_rate(nbytes: int, device: str) -> float:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device)))
        return
    for p in build(CACHE).values():  # page cache warm: measure merging, not the disk
        with open(p / "model.safetensors", "rb") as f:
            while f.read(1 << 24):
                pass
    rows = []
    for m in args.methods:
        out = subprocess.run([sys.executable, __file__, "--one", m, "--device", args.device], check=True,
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"device {args.device}; each method's process times a memory copy of the same "
          f"{rows[0]['input_bytes'] / 1e9:.2f} GB right after merging (best of 3)")
    print(f"one model: {rows[0]['model_bytes'] / 1e6:.0f} MB (bf16, 135M parameters); inputs: base + 2 experts")
    print(f"(sources + 2) x largest tensor in float32: {rows[0]['bound'] / 1e6:.0f} MB")
    print("merge RSS = peak RSS minus the process's RSS before planning (interpreter, torch, libraries)")
    print(f"{'method':16s} {'seconds':>7s} {'GB/s':>6s} {'copy GB/s':>9s} {'vs copy':>8s} {'peak RSS':>9s} "
          f"{'RSS/model':>9s} {'merge RSS':>9s} {'merge RSS/model':>15s}")
    for r in rows:
        rate = r["input_bytes"] / r["seconds"]
        merge_rss = r["peak_rss"] - r["rss_before"]
        print(f"{r['method']:16s} {r['seconds']:7.2f} {rate / 1e9:6.2f} {r['copy'] / 1e9:9.2f} {rate / r['copy']:8.1%} "
              f"{r['peak_rss'] / 1e6:7.0f}MB "
              f"{r['peak_rss'] / r['model_bytes']:9.2f} {merge_rss / 1e6:7.0f}MB {merge_rss / r['model_bytes']:15.2f}")


if __name__ == "__main__":
    main()
