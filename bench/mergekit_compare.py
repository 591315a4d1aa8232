"""The same mergekit config through ``mergekit-yaml`` and through ``evomerge merge``: wall time and output
agreement, measured in one run.

    python bench/mergekit_compare.py [--methods task_arithmetic ties slerp linear] [--repeats 5]
                                     [--device cpu|cuda] [--mergekit CMD]

Model: the 135M-parameter Llama with SmolLM2-135M's shapes that bench/merge_throughput.py builds (random
bf16 weights, base + 2 experts, cached in bench/.cache/smollm2-shape). Each config is a plain mergekit
config with ``dtype: float32`` (both tools then compute in float32 and write float32, so their tensors
can agree to float tolerance). Both tools run as the command a user types, in a new process each time
(imports included), alternating mergekit, evomerge, mergekit, evomerge...; the figure is the best of
``--repeats`` runs of each (the sources are in the page cache after the first run of either), and beside
it the ratio of the two tools' median runs: on a shared machine a single run of either moves by 10-20%.

``--mergekit`` is the command that runs mergekit-yaml (default: the venv bench/mergekit_env.sh creates,
``.venv-mergekit/bin/mergekit-yaml``); on CUDA both get their GPU flag (``--cuda``, ``--device cuda``).
Agreement per method: tensors compared by name (same names, shapes and dtypes required), the largest
absolute difference, and how many entries differ by more than 1e-5 + 1e-4 |mergekit's value|. TIES on
bf16 sources is expected to differ at a few entries: bf16 deltas tie in magnitude at the top-k cut and
mergekit's unstable sort keeps an arbitrary one (see tests/test_mergekit_parity.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_throughput import CACHE, build  # noqa: E402  (the shared 135M model builder)

CONFIGS = {
    "task_arithmetic": lambda m: {
        "merge_method": "task_arithmetic", "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6}},
                   {"model": m["e2"], "parameters": {"weight": 0.4}}]},
    "ties": lambda m: {
        "merge_method": "ties", "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.5}}]},
    "slerp": lambda m: {
        "merge_method": "slerp", "base_model": m["e1"],
        "models": [{"model": m["e1"]}, {"model": m["e2"]}],
        "parameters": {"t": [0.2, 0.8]}},
    "linear": lambda m: {
        "merge_method": "linear",
        "models": [{"model": m["base"], "parameters": {"weight": 0.2}},
                   {"model": m["e1"], "parameters": {"weight": 0.4}},
                   {"model": m["e2"], "parameters": {"weight": 0.4}}]},
}
ATOL, RTOL = 1e-5, 1e-4


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {p.returncode}):\n{log.read_text()[-3000:]}")
    return seconds


def tensors(folder: Path):
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                yield name, h.get_tensor(name)


def agreement(ref_dir: Path, got_dir: Path) -> dict:
    ref = dict(tensors(ref_dir))
    worst, off, total, problems = 0.0, 0, 0, []
    for name, g in tensors(got_dir):
        r = ref.pop(name, None)
        if r is None:
            problems.append(f"{name} only in evomerge's output")
            continue
        if r.shape != g.shape or r.dtype != g.dtype:
            problems.append(f"{name}: mergekit {r.dtype} {tuple(r.shape)}, evomerge {g.dtype} {tuple(g.shape)}")
            continue
        r, g = r.float(), g.float()
        diff = (r - g).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        off += int((diff > ATOL + RTOL * r.abs()).sum())
        total += r.numel()
    problems += [f"{name} only in mergekit's output" for name in ref]
    return {"max_abs": worst, "off": off, "total": total, "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML",
                                                         str(ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml")),
                    help="command that runs mergekit-yaml, split like a shell would (default: $MERGEKIT_YAML, "
                         "else the venv of bench/mergekit_env.sh)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = ap.parse_args()

    import yaml

    mk = shlex.split(args.mergekit)
    if not shutil.which(mk[0]) and not Path(mk[0]).exists():
        raise SystemExit(f"mergekit-yaml not found: {mk[0]} (create it with bench/mergekit_env.sh)")
    models = {k: str(v) for k, v in build(CACHE).items()}
    cuda = args.device.startswith("cuda")
    mk_flags = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"] + (["--cuda"] if cuda else [])
    evo = [sys.executable, "-m", "evomerge", "merge"]
    evo_flags = ["--device", args.device]
    work = args.work or Path(tempfile.mkdtemp(prefix="mk-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for method in args.methods:
            cfg = work / f"{method}.yml"
            cfg.write_text(yaml.safe_dump(CONFIGS[method](models) | {"dtype": "float32"}, sort_keys=False))
            times: dict[str, list[float]] = {"mergekit": [], "evomerge": []}
            outs = {"mergekit": work / f"{method}-mergekit", "evomerge": work / f"{method}-evomerge"}
            for _ in range(args.repeats):
                for tool in ("mergekit", "evomerge"):
                    shutil.rmtree(outs[tool], ignore_errors=True)
                    cmd = ([*mk, str(cfg), str(outs[tool]), *mk_flags] if tool == "mergekit"
                           else [*evo, str(cfg), "-o", str(outs[tool]), *evo_flags])
                    times[tool].append(run(cmd, work / f"{method}-{tool}.log"))
            rows.append((method, times, agreement(outs["mergekit"], outs["evomerge"])))
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    import torch

    device = args.device + (f" ({torch.cuda.get_device_name()})" if cuda else "")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at end; "
          f"device {device}; torch {torch.__version__}")
    print(f"model: base + 2 experts, 135M parameters each, bf16 on disk ({CACHE}); configs with dtype float32; "
          f"mergekit: {shlex.join(mk)} {' '.join(mk_flags)}; evomerge: evomerge merge {' '.join(evo_flags)}")
    print(f"wall seconds per command, new process each, best of {args.repeats} (all runs in brackets); speed-up of "
          f"the best runs, and of the median runs\n")
    width = 7 + 6 * args.repeats
    print(f"{'method':16s} {'mergekit s':>{width}s} {'evomerge s':>{width}s} {'speed-up':>9s} {'median':>7s} "
          f"{'max |diff|':>11s} {'entries off':>14s}")
    for method, times, agree in rows:
        mk_s, ev_s = min(times["mergekit"]), min(times["evomerge"])
        runs = {k: "[" + ", ".join(f"{t:.1f}" for t in v) + "]" for k, v in times.items()}
        median = statistics.median(times["mergekit"]) / statistics.median(times["evomerge"])
        print(f"{method:16s} {mk_s:7.2f} {runs['mergekit']:>{width - 8}s} {ev_s:7.2f} {runs['evomerge']:>{width - 8}s} "
              f"{mk_s / ev_s:8.2f}x {median:6.2f}x {agree['max_abs']:11.2e} "
              f"{agree['off']:>7d}/{agree['total'] / 1e6:.0f}M")
        for p in agree["problems"]:
            print(f"    {p}")
    return 0 if all(not a["problems"] for _, _, a in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
