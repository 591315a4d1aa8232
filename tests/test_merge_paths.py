"""The merge's execution paths agree: chunked against whole-tensor kernels, compiled against eager,
CUDA against CPU, merges from borrowed (mapped) sources against file merges; NaN/inf inputs are named on
every path."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.checkpoint import Checkpoint
from evomerge.errors import NonFiniteError
from evomerge.plan import build_plan
from evomerge.recipe import load_recipe
from tests.test_merge import merge, recipe_for, with_bad_value


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_chunked_elementwise_path_equals_whole_tensor_path(tmp_path, zoo, monkeypatch, method):
    import evomerge.merge as m

    monkeypatch.setenv("EVOMERGE_COMPILE", "0")  # the eager chunk loop (compiled kernels: tests below)
    text = recipe_for(zoo, method).replace(", density: [0.3, 0.9]", "").replace(", density: 0.5", "")
    if method == "linear":
        text = text.replace(f"base: {zoo['base']}\n", "")
    else:
        text += "depth_scaling: {alpha: 0.5, beta: 0.3}\n"
    monkeypatch.setattr(m, "CHUNK", 1 << 30)  # whole tensors
    whole, _ = merge(tmp_path, text, "whole")
    monkeypatch.setattr(m, "CHUNK", 64)  # every tensor of 256+ float32 entries goes in chunks of 64
    chunked, _ = merge(tmp_path, text, "chunked")
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()


@pytest.mark.parametrize("other", ["e2", "e1"])  # e1 with itself: parallel, the lerp fallback
def test_chunked_slerp_equals_whole_tensor_slerp(tmp_path, zoo, monkeypatch, other):
    import evomerge.merge as m

    monkeypatch.setattr("evomerge.kernels.geometric.STAT_CHUNK", 48)  # partial sums over several chunks
    text = (f"method: slerp\nsources: [{{model: {zoo['e1']}}}, {{model: {zoo[other]}}}]\n"
            "parameters: {t: [0.2, 0.9]}\ndtype: bfloat16\n")
    monkeypatch.setattr(m, "CHUNK", 1 << 30)
    whole, _ = merge(tmp_path, text, "whole")
    calls = []
    real = m._merge_slerp_chunked
    monkeypatch.setattr(m, "_merge_slerp_chunked", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(m, "CHUNK", 64)
    chunked_out, _ = merge(tmp_path, text, "chunked")
    assert calls  # the chunked path ran
    assert (whole / "model.safetensors").read_bytes() == (chunked_out / "model.safetensors").read_bytes()


def stored_as(tmp_path, source, name, dtype, change=None):
    """A copy of checkpoint ``source`` at tmp_path/name with every tensor stored as ``dtype``; ``change``:
    (tensor, factor) that tensor is scaled by first."""
    out = tmp_path / name
    shutil.copytree(source, out)
    sd = load_file(out / "model.safetensors")
    if change is not None:
        sd[change[0]] *= change[1]
    save_file({k: v.to(dtype) for k, v in sd.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(("other", "stored", "dtype"), [
    ("e2", torch.bfloat16, "float32"),  # stored bfloat16, float32 output combined in place
    ("near", torch.float32, "float32"),  # one tensor scaled: the lerp fallback between different tensors
    ("near", torch.bfloat16, "bfloat16"),
])
def test_chunked_slerp_equals_whole_tensor_slerp_across_dtypes(tmp_path, zoo, monkeypatch, other, stored, dtype):
    import evomerge.merge as m
    from evomerge.kernels.geometric import slerp_coefficients

    monkeypatch.setattr("evomerge.kernels.geometric.STAT_CHUNK", 48)
    name = "model.layers.1.mlp.up_proj.weight"
    a = stored_as(tmp_path, zoo["e1"], "a", stored)
    c = stored_as(tmp_path, zoo["e1"], "c", stored, change=(name, 1.37)) if other == "near" \
        else stored_as(tmp_path, zoo[other], "c", stored)
    if other == "near":
        pair = [load_file(p / "model.safetensors")[name] for p in (a, c)]
        assert not torch.equal(*pair) and slerp_coefficients(0.3, *pair) is None
    text = f"method: slerp\nsources: [{{model: {a}}}, {{model: {c}}}]\nparameters: {{t: 0.3}}\ndtype: {dtype}\n"
    monkeypatch.setattr(m, "CHUNK", 1 << 30)
    whole, _ = merge(tmp_path, text, "whole")
    monkeypatch.setattr(m, "CHUNK", 64)
    chunked_out, _ = merge(tmp_path, text, "chunked")
    assert (whole / "model.safetensors").read_bytes() == (chunked_out / "model.safetensors").read_bytes()


def test_overflowing_slerp_output_is_refused_on_the_chunked_path(tmp_path, zoo, monkeypatch):
    """Finite inputs whose merge overflows float32 (opposite entries near the float32 limit, so lerp's c - a is
    infinite) are refused naming the merged tensor, by the chunk loop as by the whole-tensor path."""
    import evomerge.merge as m

    name = "model.layers.2.mlp.down_proj.weight"
    big = with_bad_value(tmp_path, zoo["e1"], "big", name, (1, 5), 3e38)
    low = with_bad_value(tmp_path, zoo["e2"], "low", name, (1, 5), -3e38)
    text = f"method: slerp\nsources: [{{model: {big}}}, {{model: {low}}}]\nparameters: {{t: 0.5}}\n"
    for chunk in (1 << 30, 64):
        monkeypatch.setattr(m, "CHUNK", chunk)
        with pytest.raises(NonFiniteError, match=rf"merged tensor '{name}' \(method slerp\) contains NaN"):
            merge(tmp_path, text, f"out{chunk}")
        assert not (tmp_path / f"out{chunk}").exists()


@pytest.mark.parametrize("method", ["slerp", "task_arithmetic"])
def test_nan_input_is_named_on_the_chunked_paths(tmp_path, zoo, monkeypatch, method):
    """A NaN (SLERP's statistics pass) or an infinity (the eager task-vector chunk loop) in one source is
    named with its model, and nothing is written."""
    import evomerge.merge as m

    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    monkeypatch.setattr(m, "CHUNK", 64)
    name = "model.layers.1.mlp.up_proj.weight"
    if method == "slerp":
        bad = with_bad_value(tmp_path, zoo["e2"], "bad", name, (1, 5), float("nan"))
        text = f"method: slerp\nsources: [{{model: {zoo['e1']}}}, {{model: {bad}}}]\nparameters: {{t: 0.5}}\n"
    else:
        bad = with_bad_value(tmp_path, zoo["e1"], "bad", name, (3, 3), float("inf"))
        text = f"method: task_arithmetic\nbase: {zoo['base']}\nsources: [{{model: {bad}, parameters: {{weight: 0.0}}}}]\n"
    with pytest.raises(NonFiniteError, match=rf"{name}' of model '.*bad' contains NaN or infinity"):
        merge(tmp_path, text)
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "slerp"])
def test_cuda_merge_matches_cpu(tmp_path, zoo, method):
    text = recipe_for(zoo, method) if method != "slerp" else \
        f"method: slerp\nsources: [{{model: {zoo['e1']}}}, {{model: {zoo['e2']}}}]\nparameters: {{t: 0.3}}\n"
    if method == "task_arithmetic":
        text = text.replace(", density: [0.3, 0.9]", "").replace(", density: 0.5", "")
    cpu, _ = merge(tmp_path, text, "cpu")
    gpu, _ = merge(tmp_path, text, "gpu", device="cuda")
    a, b = load_file(cpu / "model.safetensors"), load_file(gpu / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,params", [
    ("ties", "density: 0.4"), ("breadcrumbs", "density: 0.5, gamma: 0.1"),
    ("breadcrumbs_ties", "density: 0.9, gamma: 0.2"), ("dare_ties", "density: 0.5"), ("dare_linear", "density: 0.3"),
])
def test_chunked_pipeline_equals_whole_tensor_path(tmp_path, zoo, monkeypatch, method, params):
    """Two histogram passes + entrywise chunks give the same bits as whole-tensor selection."""
    import evomerge.merge as m

    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    text = f"""method: {method}
base: {zoo['base']}
sources:
  - {{model: {zoo['e1']}, parameters: {{weight: 0.7, {params}}}}}
  - {{model: {zoo['e2']}, parameters: {{weight: 0.5, {params}}}}}
depth_scaling: {{alpha: 0.6, beta: 0.4}}
dtype: bfloat16
"""
    monkeypatch.setattr(m.chunked, "BLOCK", 256)  # chunks and random-stream blocks of 256 entries
    monkeypatch.setattr("evomerge.kernels.select.BLOCK", 256)
    monkeypatch.setattr(m, "CHUNK", 1 << 30)
    whole, _ = merge(tmp_path, text, "whole")
    monkeypatch.setattr(m, "CHUNK", 64)  # tensors over 256 bytes go through the chunked pipeline
    chunked_out, _ = merge(tmp_path, text, "chunked")
    a, b = load_file(whole / "model.safetensors"), load_file(chunked_out / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def fused_everywhere(monkeypatch):
    """Compiled chunk kernels for every tensor, in chunks of 64 entries (several per tensor of the zoo)."""
    from evomerge.kernels import fused

    if fused.available() is not None:
        pytest.skip(f"no compiled kernels here: {fused.available()}")
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "CHUNK", 64)
    return fused


def fast_calls() -> int:
    """Calls of the compiled kernels and of the native top-k kernels (TIES on the CPU) so far."""
    from evomerge.kernels import fused, native

    return fused.stats["calls"] + native.stats["calls"]


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [("ties", "density: 0.4"), ("dare_ties", "density: 0.5"),
                                           ("task_arithmetic", "")])
def test_compiled_path_agrees_with_eager_path(tmp_path, zoo, monkeypatch, method, params):
    """The fused kernels through the planner and executor: the eager result to float32 rounding."""
    text = f"""method: {method}
base: {zoo['base']}
sources:
  - {{model: {zoo['e1']}, parameters: {{weight: 0.7{', ' + params if params else ''}}}}}
  - {{model: {zoo['e2']}, parameters: {{weight: 0.5{', ' + params if params else ''}}}}}
depth_scaling: {{alpha: 0.6, beta: 0.4}}
"""
    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    eager, _ = merge(tmp_path, text, "eager", seed=5)
    fused_everywhere(monkeypatch)
    before = fast_calls()
    compiled, _ = merge(tmp_path, text, "compiled", seed=5)
    again, _ = merge(tmp_path, text, "again", seed=5)
    assert fast_calls() > before  # the compiled path did run (kernels may be cached from earlier)
    a, b = load_file(eager / "model.safetensors"), load_file(compiled / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7 * float(a[name].abs().max()))
    assert (compiled / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_nan_input_is_named_on_the_compiled_path(tmp_path, zoo, monkeypatch):
    fused_everywhere(monkeypatch)
    bad = with_bad_value(tmp_path, zoo["e2"], "nan", "model.layers.1.mlp.up_proj.weight", (3, 3), float("nan"))
    with pytest.raises(NonFiniteError, match=r"up_proj.weight' of model '.*nan' contains NaN or infinity"):
        merge(tmp_path, recipe_for(zoo).replace(str(zoo["e2"]), str(bad)))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_overflowing_float16_is_refused_on_the_compiled_path(tmp_path, zoo, monkeypatch):
    fused_everywhere(monkeypatch)
    name = "model.layers.1.mlp.up_proj.weight"
    big = with_bad_value(tmp_path, zoo["e1"], "big", name, (2, 3), 70000.0)  # the largest task vector entry: kept
    text = recipe_for(zoo, extra="dtype: float16").replace(str(zoo["e1"]), str(big))
    with pytest.raises(NonFiniteError, match=rf"merged tensor '{name}' \(method ties\) overflows float16"):
        merge(tmp_path, text)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", ""), ("linear", ""), ("ties", ", density: 0.5"), ("dare_ties", ", density: 0.5"),
    ("della", ", density: 0.5, epsilon: 0.1"), ("breadcrumbs", ", density: 0.6, gamma: 0.1"),
    ("slerp", ""), ("model_stock", ""), ("karcher", ""), ("tsv", ""), ("consensus", ""),
])
def test_borrowed_sources_are_never_written(tmp_path, zoo, method, params):
    """A search merges straight from views of the mapped source files (borrow=True). Kernels that work in
    place must get copies: the next candidate would otherwise read what the last one wrote."""
    from evomerge.checkpoint.reader import CheckpointCache
    from evomerge.merge import merge_tensor
    from evomerge.recipe.schema import Recipe

    text = f"method: {method}\nbase: {zoo['base']}\nsources:\n" + "".join(
        f"  - {{model: {zoo[m]}, parameters: {{weight: 0.6{params}}}}}\n" for m in ("e1", "e2"))
    if method == "slerp":
        text = f"method: slerp\nsources: [{{model: {zoo['e1']}}}, {{model: {zoo['e2']}}}]\nparameters: {{t: 0.3}}\n"
    if method == "model_stock":  # no parameters
        text = text.replace(", parameters: {weight: 0.6}", "")
    (tmp_path / "r.yaml").write_text(text)
    recipe, root = load_recipe(tmp_path / "r.yaml")
    assert isinstance(recipe, Recipe)
    cache = CheckpointCache()
    try:
        plan = build_plan(recipe, root, checkpoints=cache)
        first = {j.out.name: merge_tensor(plan, j, borrow=True).clone() for j in plan.jobs}
        second = {j.out.name: merge_tensor(plan, j, borrow=True) for j in plan.jobs}
        for ck in plan.checkpoints:
            with Checkpoint(ck.path) as plain:  # the mapped bytes still hold the files' values
                for name in ck.names:
                    assert torch.equal(ck.borrow(name), plain.get(name, dtype=None)), (ck.path.name, name)
        plan.close()
    finally:
        cache.close()
    _, fresh = merge(tmp_path, text, "fresh")
    out = load_file(tmp_path / "fresh" / "model.safetensors")
    for name, value in second.items():
        assert torch.equal(first[name], value), name
        # run_merge computes with one thread fewer: reductions (model stock, TSV's SVD) may round differently
        torch.testing.assert_close(out[name], value.to(out[name].dtype), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_search_merges_reuse_magnitude_histograms_until_a_source_changes(tmp_path, zoo, monkeypatch):
    """Candidates with new densities through one CheckpointCache (as a search's evaluator merges): the
    histograms built by the first are kept with the open source checkpoints and settle the later ones to
    the eager result; a source rewritten on disk is reopened without them."""
    from evomerge.checkpoint.reader import CheckpointCache
    from evomerge.merge import merge_tensor
    from evomerge.recipe.schema import Recipe

    e1 = tmp_path / "e1"
    shutil.copytree(zoo["e1"], e1)

    def plan_for(density: float, cache):
        return build_plan(Recipe.model_validate({
            "method": "ties", "base": str(zoo["base"]),
            "sources": [{"model": str(e1), "parameters": {"weight": 0.6, "density": density}},
                        {"model": str(zoo["e2"]), "parameters": {"weight": 0.4, "density": 1.0 - density}}]}),
            tmp_path, checkpoints=cache)

    def merged(plan):
        return {j.out.name: merge_tensor(plan, j, borrow=True) for j in plan.jobs}

    def agrees(plan) -> None:
        got = merged(plan)
        monkeypatch.setenv("EVOMERGE_COMPILE", "0")
        want = merged(plan)
        monkeypatch.setenv("EVOMERGE_COMPILE", "1")
        for name, t in want.items():
            torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7 * float(t.abs().max()))

    fused = fused_everywhere(monkeypatch)
    monkeypatch.setattr(fused, "_repeats", True)  # as in a search's evaluator (fused.expect_repeats)
    cache = CheckpointCache()
    first = plan_for(0.3, cache)
    source = first.checkpoints[1]  # base first, then the sources
    agrees(first)
    kept = dict(source.derived)
    assert kept and all(key[0] == "magnitudes" for key in kept)
    calls = fast_calls()
    agrees(plan_for(0.6, cache))
    assert source.derived == kept  # the same histograms, none built anew
    assert fast_calls() > calls
    sd = load_file(e1 / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    sd[name] = sd[name] * 3.0
    save_file(sd, e1 / "model.safetensors", metadata={"format": "pt"})
    changed = plan_for(0.6, cache)
    assert changed.checkpoints[1] is not source and not changed.checkpoints[1].derived
    agrees(changed)
    monkeypatch.setattr(fused, "_repeats", False)  # a single merge (evomerge merge) keeps nothing
    single = plan_for(0.5, CheckpointCache())
    agrees(single)
    assert not single.checkpoints[1].derived
    cache.close()
