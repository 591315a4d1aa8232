"""Parity with the real mergekit: the same mergekit config through mergekit-yaml and through evomerge.

The reference is mergekit in its own venv, ``.venv-mergekit`` (created by ``bench/mergekit_env.sh``; the
tests skip when it is missing). For every deterministic method a config over tiny Llama checkpoints is
merged by both, and every output tensor must match: same names, shapes and dtypes, values within
float32 tolerance. The randomized methods (dare_*, della*) draw from mergekit's single global RNG stream,
so they cannot agree bit for bit and are only compared at density 1, where they draw nothing.
Not covered: tokenizer_source (the default mergekit 0.1.4 venv runs transformers 4, which cannot read the
tokenizer files transformers 5 writes), and inputs computed in bfloat16 (mergekit computes in the loaded
dtype, evomerge in float32: they agree to bf16 rounding only).

mergekit-yaml spends ~8 s importing on every start, so by default one interpreter of the mergekit venv
runs the mergekit-yaml command (its click entry point, with the same argument parsing) once per config.
``EVOMERGE_PARITY_CLI=1`` starts the ``mergekit-yaml`` executable once per config instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
MK_VENV = Path(os.environ.get("EVOMERGE_MERGEKIT_VENV", ROOT / ".venv-mergekit"))  # bench/mergekit_env.sh
MK_YAML = MK_VENV / "bin" / "mergekit-yaml"
MK_PYTHON = MK_VENV / "bin" / "python"
MK_FLAGS = ["--lazy-unpickle", "--quiet", "--no-write-model-card"]  # CPU is the default device
ATOL, RTOL = 1e-5, 1e-4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MK_YAML.exists(),
                       reason=f"the real mergekit is not installed: {MK_YAML} is missing "
                              "(create it with bench/mergekit_env.sh)"),
]

# Runs inside the mergekit venv: the mergekit-yaml command for each (name, config, out) job.
_DRIVER = r"""
import json, sys, time, traceback
from mergekit.scripts.run_yaml import main
jobs, flags, results = json.load(open(sys.argv[1])), json.loads(sys.argv[3]), {}
for name, cfg, out in jobs:
    t = time.perf_counter()
    try:
        main.main(args=[cfg, out, *flags], prog_name="mergekit-yaml", standalone_mode=False)
        results[name] = {"rc": 0, "log": "", "seconds": time.perf_counter() - t}
    except BaseException:
        results[name] = {"rc": 1, "log": traceback.format_exc(), "seconds": time.perf_counter() - t}
json.dump(results, open(sys.argv[2], "w"))
"""


# name -> config builder over the model paths ``m`` (base, e1..e3; bbase, be1, be2 in bfloat16).
CASES = {
    "linear": lambda m: {
        "merge_method": "linear",
        "models": [{"model": m["e1"], "parameters": {"weight": 0.5}},
                   {"model": m["e2"], "parameters": {"weight": [0.1, 0.9]}},
                   {"model": m["e3"], "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.2}]}}],
        "dtype": "float32",
    },
    # an unlisted base_model joins a linear merge, with the weight from the global parameters
    "linear_unlisted_base": lambda m: {
        "merge_method": "linear",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6}},
                   {"model": m["e2"], "parameters": {"weight": 0.3}}],
        "parameters": {"weight": 0.1, "normalize": False},
    },
    "task_arithmetic": lambda m: {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [{"model": m["base"]},
                   {"model": m["e1"], "parameters": {"weight": 0.6}},
                   {"model": m["e2"], "parameters": {"weight": 0.4}}],
        "parameters": {"lambda": 0.8},
        "dtype": "float32",
    },
    # slices with different input layers: gradients run over the slice, per-model filters see input names
    "task_arithmetic_slices": lambda m: {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "slices": [
            {"sources": [{"model": m["base"], "layer_range": [0, 2]},
                         {"model": m["e1"], "layer_range": [2, 4],
                          "parameters": {"weight": [{"filter": "layers.3.", "value": 2.0}, {"value": [0.2, 0.8]}]}}]},
            {"sources": [{"model": m["base"], "layer_range": [2, 4]},
                         {"model": m["e1"], "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
        ],
    },
    "ties": lambda m: {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.5}}],
        "dtype": "float32",
    },
    "ties_gradient_filter": lambda m: {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}],
                                                     "density": [0.3, 0.7]}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.5}},
                   {"model": m["e3"], "parameters": {"weight": 0.3, "density": [0.9, 0.2]}}],
        "parameters": {"int8_mask": True, "lambda": 1.1},
    },
    # bfloat16 checkpoints loaded as float32 (mergekit casts every input at load time; the output stays
    # float32). Not ties: bf16 deltas have many equal magnitudes, and where they tie at the top-k cut
    # mergekit's unstable argsort keeps an arbitrary one (semantics spec 3.3), so no two implementations agree.
    "task_arithmetic_bf16_dtype_float32": lambda m: {
        "merge_method": "task_arithmetic",
        "base_model": m["bbase"],
        "models": [{"model": m["be1"], "parameters": {"weight": 0.6}},
                   {"model": m["be2"], "parameters": {"weight": [0.4, 1.2]}}],
        "dtype": "float32",
    },
    # Breadcrumbs. int(gamma * numel) > 0 for every tensor here (norms have 32 entries), so mergekit's
    # whole-tensor zeroing at int(gamma * numel) == 0, which evomerge does not reproduce, never triggers.
    # density and gamma in 1/32 steps make every band count an exact integer (all sizes are multiples
    # of 32), so these cases hold whatever the rounding of the band edges:
    "breadcrumbs_exact": lambda m: {
        "merge_method": "breadcrumbs",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6, "density": 0.75, "gamma": 0.125}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.75, "gamma": 0.125}}],
    },
    "breadcrumbs_ties_exact": lambda m: {
        "merge_method": "breadcrumbs_ties",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6, "density": 0.75, "gamma": 0.125}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.5,
                                                     "gamma": [{"filter": "norm", "value": 0.1875},
                                                               {"value": 0.0625}]}},
                   {"model": m["e3"], "parameters": {"weight": 0.5, "density": 0.8125, "gamma": 0.0625}}],
    },
    # ... and these hit the band-edge rounding: mergekit keeps exactly int(density * numel) entries,
    # dropping n_top = int(gamma * numel) largest and n_bot = numel - target - n_top smallest (spec 3.3)
    "breadcrumbs": lambda m: {
        "merge_method": "breadcrumbs",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.1}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.8, "gamma": 0.1}}],
    },
    "breadcrumbs_ties": lambda m: {
        "merge_method": "breadcrumbs_ties",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6, "density": [0.6, 0.9], "gamma": 0.1}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.7,
                                                     "gamma": [{"filter": "norm", "value": 0.2}, {"value": 0.05}]}}],
    },
    # density + gamma > 1: mergekit shrinks the top cut to numel - int(density*numel) (spec 3.3)
    "breadcrumbs_density_plus_gamma_over_1": lambda m: {
        "merge_method": "breadcrumbs",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6, "density": 0.9375, "gamma": 0.125}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.9375, "gamma": 0.125}}],
    },
    "slerp": lambda m: {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["e1"]}, {"model": m["base"]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]},
        "dtype": "float32",
    },
    # out_dtype: computed in float32, saved as bfloat16
    "ties_out_dtype_bfloat16": lambda m: {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": m["e2"], "parameters": {"weight": 0.4, "density": 0.5}}],
        "out_dtype": "bfloat16",
    },
    # dare at density 1 draws nothing, so it is deterministic: checks its defaults (normalize off; the L1
    # rescale is a no-op) and the sign election of dare_ties
    "dare_ties_density_1": lambda m: {
        "merge_method": "dare_ties",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6}},
                   {"model": m["e2"], "parameters": {"weight": 0.4}}],
    },
    "dare_linear_density_1": lambda m: {
        "merge_method": "dare_linear",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.6}},
                   {"model": m["e2"], "parameters": {"weight": [0.4, 0.8]}}],
    },
    "model_stock": lambda m: {
        "merge_method": "model_stock",
        "base_model": m["base"],
        "models": [{"model": m["e1"]}, {"model": m["e2"]}, {"model": m["e3"]}],
    },
    "model_stock_filter_wise": lambda m: {
        "merge_method": "model_stock",
        "base_model": m["base"],
        "models": [{"model": m["e1"]}, {"model": m["e2"]}, {"model": m["e3"]}],
        "parameters": {"filter_wise": True},
    },
    "sce_topk_0.5": lambda m: {
        "merge_method": "sce",
        "base_model": m["base"],
        "models": [{"model": m["e1"]}, {"model": m["e2"]}, {"model": m["e3"]}],
        "parameters": {"select_topk": 0.5},
    },
    "sce_topk_1.0": lambda m: {
        "merge_method": "sce",
        "base_model": m["base"],
        "models": [{"model": m["e1"]}, {"model": m["e2"]}, {"model": m["e3"]}],
        "parameters": {"select_topk": 1.0},
    },
    "karcher": lambda m: {
        "merge_method": "karcher",
        "models": [{"model": m["e1"]}, {"model": m["e2"]}, {"model": m["e3"]}],
    },
    # an unlisted base_model joins karcher; per-model weights are ignored
    "karcher_unlisted_base": lambda m: {
        "merge_method": "karcher",
        "base_model": m["base"],
        "models": [{"model": m["e1"], "parameters": {"weight": 0.9}}, {"model": m["e2"]}],
        "parameters": {"max_iter": 20, "tol": 1e-6},
    },
    # layers from two models; a scale (filter + gradient) on the last slice, which also feeds model.norm
    # and lm_head (post weights come from slices[-1], at t = 0)
    "passthrough": lambda m: {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": m["base"], "layer_range": [0, 2]}]},
            {"sources": [{"model": m["e1"], "layer_range": [1, 4],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                   {"filter": "down_proj", "value": [0.5, 1.5]},
                                                   {"filter": "norm", "value": 2.0},
                                                   {"value": 1.0}]}}]},
        ],
        "dtype": "float32",
    },
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from evomerge.zoo.tiny import expert_of, tiny_llama

    root = tmp_path_factory.mktemp("parity-zoo")
    base = tiny_llama(root / "base", seed=0, layers=4)
    out = {"base": base}
    for i in (1, 2, 3):
        out[f"e{i}"] = expert_of(base, root / f"e{i}", seed=i, scale=0.02)
    bbase = tiny_llama(root / "bbase", seed=10, layers=4, dtype=torch.bfloat16)
    out["bbase"] = bbase
    for i in (1, 2):
        out[f"be{i}"] = expert_of(bbase, root / f"be{i}", seed=10 + i, scale=0.02)
    return {k: str(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory) -> dict[str, dict]:
    """Every case merged once by the real mergekit: name -> {cfg, out, rc, log, seconds}."""
    root = tmp_path_factory.mktemp("parity-mergekit")
    jobs = []
    for name in CASES:
        cfg = root / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(CASES[name](models), sort_keys=False))
        jobs.append((name, str(cfg), str(root / f"{name}-out")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)  # nothing of evomerge's venv may leak into mergekit's
    results: dict[str, dict] = {}
    if os.environ.get("EVOMERGE_PARITY_CLI"):
        for name, cfg, out in jobs:
            t = time.perf_counter()
            p = subprocess.run([str(MK_YAML), cfg, out, *MK_FLAGS], capture_output=True, text=True, env=env,
                               timeout=300)
            results[name] = {"rc": p.returncode, "log": p.stdout + p.stderr, "seconds": time.perf_counter() - t}
    else:
        (root / "jobs.json").write_text(json.dumps(jobs))
        p = subprocess.run([str(MK_PYTHON), "-c", _DRIVER, str(root / "jobs.json"), str(root / "results.json"),
                            json.dumps(MK_FLAGS)], capture_output=True, text=True, env=env, timeout=600)
        if p.returncode != 0:
            pytest.fail(f"the mergekit driver failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
        results = json.loads((root / "results.json").read_text())
    for name, cfg, out in jobs:
        results[name].update(cfg=cfg, out=out)
    return results


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(f)
        assert not (set(part) & set(tensors)), f"tensor names repeated across shards in {path}"
        tensors.update(part)
    return tensors


def _run_evomerge(cfg: str, out: Path) -> Path:
    from evomerge.merge import run_merge
    from evomerge.plan import build_plan
    from evomerge.recipe import load_recipe

    recipe, root = load_recipe(cfg)
    plan = build_plan(recipe, root)
    try:
        run_merge(plan, out, progress=False)
    finally:
        plan.close()
    return out


def _compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between mergekit's tensors (ref) and evomerge's (got); empty when equal."""
    problems = []
    if set(ref) != set(got):
        problems.append(f"tensor names differ: only mergekit {sorted(set(ref) - set(got))}, "
                        f"only evomerge {sorted(set(got) - set(ref))}")
    diffs = []
    for name in sorted(set(ref) & set(got)):
        a, b = ref[name], got[name]
        if a.shape != b.shape:
            problems.append(f"{name}: shape mergekit {list(a.shape)} vs evomerge {list(b.shape)}")
            continue
        if a.dtype != b.dtype:
            problems.append(f"{name}: dtype mergekit {a.dtype} vs evomerge {b.dtype}")
        a, b = a.float(), b.float()
        if not torch.allclose(b, a, atol=ATOL, rtol=RTOL):
            d = (a - b).abs()
            rel = (d / a.abs().clamp_min(1e-12)).max().item()
            diffs.append((d.max().item(), name, rel, int((d > ATOL + RTOL * a.abs()).sum()), a.numel()))
    if diffs:
        diffs.sort(reverse=True)
        problems.append(f"{len(diffs)} of {len(ref)} tensors differ beyond atol {ATOL} / rtol {RTOL}; "
                        f"max abs diff {diffs[0][0]:.3g}:")
        problems += [f"  {n}: max abs {m:.3g}, max rel {r:.3g}, {k}/{numel} entries off"
                     for m, n, r, k, numel in diffs[:12]]
    return problems


@pytest.mark.parametrize("case", CASES)
def test_matches_mergekit(case, mergekit_outputs, tmp_path):
    res = mergekit_outputs[case]
    assert res["rc"] == 0, f"mergekit-yaml failed on {res['cfg']}:\n{res['log'][-4000:]}"
    ref = _load_dir(res["out"])
    got = _load_dir(_run_evomerge(res["cfg"], tmp_path / "evomerge-out"))
    problems = _compare(ref, got)
    assert not problems, f"{case}: evomerge differs from mergekit ({res['cfg']}):\n" + "\n".join(problems)


def test_compare_sees_differences():
    """The comparison itself: it must notice a changed value, a missing tensor and a shape change."""
    ref = {"a": torch.ones(4), "b": torch.zeros(2, 2)}
    assert _compare(ref, {k: v.clone() for k, v in ref.items()}) == []
    assert _compare(ref, {"a": torch.ones(4) + 1e-3, "b": torch.zeros(2, 2)})
    assert _compare(ref, {"a": torch.ones(4)})
    assert _compare(ref, {"a": torch.ones(4), "b": torch.zeros(4)})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
