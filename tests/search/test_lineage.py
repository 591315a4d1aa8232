"""Lineage candidates: layer-ordered SLERP crossover and materialization of candidate references."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.checkpoint.naming import parse
from evomerge.errors import RecipeError
from evomerge.kernels.geometric import slerp_tensors
from evomerge.merge import run_merge
from evomerge.plan import build_plan
from evomerge.recipe.values import Groups
from evomerge.search.dataflow import DataFlowSpace
from evomerge.search.lineage import LineageResolver, candidate_hash, crossover_recipe
from evomerge.search.types import candidate_ref


def merge(recipe, out):
    plan = build_plan(recipe, out.parent)
    try:
        return run_merge(plan, out, progress=False)
    finally:
        plan.close()


def tensors(path):
    return load_file(path / "model.safetensors")


def test_crossover_recipe_shape():
    r = crossover_recipe("a", "candidate:abc", 4, split=1, mix=0.25)
    assert r.method == "slerp" and [s.model for s in r.sources] == ["a", "candidate:abc"]
    assert r.parameters == {"t": Groups(groups=[0.75, 0.25, 0.25, 0.25])}
    assert crossover_recipe("a", "b", 3, split=3, mix=0.1).parameters["t"].groups == [0.9, 0.9, 0.9]
    for kw, match in [({"split": 5}, "split"), ({"mix": 1.5}, "mix"), ({"num_layers": 0}, "num_layers")]:
        with pytest.raises(ValueError, match=match):
            crossover_recipe("a", "b", **{"num_layers": 4, "split": 2, "mix": 0.5, **kw})


def test_crossover_hand_case_split_2_mix_07(tmp_path, zoo):
    """Layers 0-1 (and the embedding) keep 70% of A, layers 2-3 (and final norm, head) 30%: t = 0.3 / 0.7."""
    out = merge(crossover_recipe(str(zoo["e1"]), str(zoo["e2"]), 4, split=2, mix=0.7), tmp_path / "x")
    got, a, b = tensors(out), tensors(zoo["e1"]), tensors(zoo["e2"])
    assert got.keys() == a.keys()
    for name, x in got.items():
        layer = parse(name).layer
        t = 0.3 if (layer is not None and layer < 2) or "embed" in name else 0.7
        want = slerp_tensors(t, a[name].float().clone(), b[name].float())
        # equal up to float32 reduction order (norms and dot products run on other thread counts)
        torch.testing.assert_close(x, want, atol=1e-7, rtol=1e-6, msg=name)
        other = slerp_tensors(1.0 - t, a[name].float().clone(), b[name].float())
        assert (x - other).abs().max() > 1e-3, name  # the tolerance does tell t from 1 - t
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], got["model.layers.3.mlp.up_proj.weight"])


@pytest.fixture
def lineage(zoo):
    """child = crossover(e1, e2); grandchild = crossover(child, e3); top = crossover(grandchild, base)."""
    child = crossover_recipe(str(zoo["e1"]), str(zoo["e2"]), 4, split=2, mix=0.7)
    h1 = child.content_hash()
    grandchild = crossover_recipe(candidate_ref(h1), str(zoo["e3"]), 4, split=1, mix=0.4)
    h2 = grandchild.content_hash()
    top = crossover_recipe(candidate_ref(h2), str(zoo["base"]), 4, split=3, mix=0.8)
    return {h1: child, h2: grandchild}, top, (h1, h2)


def test_two_level_lineage_matches_merges_by_hand(tmp_path, zoo, lineage):
    store, top, (h1, h2) = lineage
    resolver = LineageResolver(store, tmp_path / "cache", tmp_path)
    resolved = resolver.resolve(top)
    assert resolver.merged == [h1, h2]  # parents first, each once
    assert [s.model for s in resolved.sources] == [str((tmp_path / "cache" / h2).resolve()), str(zoo["base"])]
    out = resolver.materialize(top, tmp_path / "top")
    assert resolver.merged == [h1, h2]  # the second resolve reused the cache

    d1 = merge(store[h1], tmp_path / "hand1")
    d2 = merge(crossover_recipe(str(d1), str(zoo["e3"]), 4, split=1, mix=0.4), tmp_path / "hand2")
    d3 = merge(crossover_recipe(str(d2), str(zoo["base"]), 4, split=3, mix=0.8), tmp_path / "hand3")
    got, want = tensors(out), tensors(d3)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_cache_is_reused_across_resolvers(tmp_path, lineage):
    store, top, (h1, h2) = lineage
    LineageResolver(store, tmp_path / "cache", tmp_path).resolve(top)
    files = sorted((tmp_path / "cache").glob("*/model.safetensors"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = LineageResolver(store, tmp_path / "cache", tmp_path)
    again.resolve(top)
    assert again.merged == [] and len(files) == 2
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    # a cached grandchild is enough: its parent is not needed (nor merged) any more
    only_h2 = LineageResolver({}, tmp_path / "cache", tmp_path)
    only_h2.resolve(top)
    assert only_h2.merged == []


def test_missing_candidates_and_cycles_are_reported(tmp_path, zoo, lineage):
    store, top, (h1, h2) = lineage
    resolver = LineageResolver({h2: store[h2]}, tmp_path / "cache", tmp_path)
    with pytest.raises(RecipeError, match=f"unknown candidate 'candidate:{h1}' \\(named by candidate:{h2}\\)"):
        resolver.resolve(top)
    loop = {"x": crossover_recipe("candidate:y", str(zoo["e1"]), 4, 1, 0.5),
            "y": crossover_recipe("candidate:x", str(zoo["e2"]), 4, 1, 0.5)}
    with pytest.raises(RecipeError, match="lineage cycle: candidate:x -> candidate:y -> candidate:x"):
        LineageResolver(loop, tmp_path / "c2", tmp_path).resolve(crossover_recipe("candidate:x", "m", 4, 1, 0.5))
    with pytest.raises(RecipeError, match="not a candidate reference"):
        candidate_hash("candidate:../../etc")


def test_dfs_over_a_candidate_resolves_base_and_slices(tmp_path, zoo, lineage):
    """Combined PS + DFS: model A of the data-flow space is an earlier candidate."""
    store, _, (h1, _) = lineage
    space = DataFlowSpace(candidate_ref(h1), str(zoo["e3"]), 4)
    g = space.x0()
    g[[4, 5]] = 0.9  # B0, B1 of the first repeat join the path after A's layers
    recipe = space.decode(g)
    resolver = LineageResolver(store, tmp_path / "cache", tmp_path)
    resolved = resolver.resolve(recipe)
    cached = str((tmp_path / "cache" / h1).resolve())
    assert resolved.base == cached and resolved.slices[0].sources[0].model == cached
    assert "candidate:" not in resolved.model_dump_json()
    out = resolver.materialize(recipe, tmp_path / "dfs")
    got, a = tensors(out), tensors(tmp_path / "cache" / h1)
    assert torch.equal(got["model.norm.weight"], a["model.norm.weight"])
    assert torch.equal(got["model.layers.4.mlp.up_proj.weight"], tensors(zoo["e3"])["model.layers.0.mlp.up_proj.weight"])
    assert np.isclose(space.cost(g), 6)
