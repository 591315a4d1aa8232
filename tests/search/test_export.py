"""Export: a run's candidate becomes a standard checkpoint that loads, generates and scores as recorded."""

import pytest
import yaml

from evomerge.search.export import export_candidate, to_mergekit
from evomerge.search.run import start_run
from evomerge.search.store import read_run
from tests.search.test_run import config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(quick_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    ps = config(quick_zoo, tmp, budget=5, optimizer={"name": "random"},
                space={"kind": "parameters", "method": "ties", "layer_groups": 1})
    start_run(ps, tmp / "ps", progress=False)
    # a lineage: every candidate of this data-flow search names model A, itself a merge recipe, by hash
    (tmp / "a.yaml").write_text(yaml.safe_dump({
        "method": "task_arithmetic", "base": str(quick_zoo.base),
        "sources": [{"model": str(quick_zoo.experts["add"]), "parameters": {"weight": 0.8}},
                    {"model": str(quick_zoo.experts["reverse"]), "parameters": {"weight": 0.6}}]}))
    lineage = config(quick_zoo, tmp, budget=3, optimizer={"name": "random"},
                     space={"kind": "dataflow", "model_a": str(tmp / "a.yaml"),
                            "model_b": str(quick_zoo.experts["reverse"]), "repeats": 1})
    start_run(lineage, tmp / "lineage", progress=False)
    return tmp


def _best(run_dir):
    view = read_run(run_dir)
    by_hash = {c.recipe_hash: c.id for c in view.candidates.values()}
    scored = [(sum(r.results[t]["search"]["metrics"]["mean"] for t in r.results), by_hash[h])
              for h, r in view.results.items() if not r.failed]
    return max(scored)[1], view


@pytest.mark.parametrize("run", ["ps", "lineage"])
def test_export_round_trip(runs, tmp_path, run):
    from evomerge.fitness.backends.hf import HFBackend
    from evomerge.fitness.task import load_task

    cid, view = _best(runs / run)
    out = export_candidate(runs / run, str(cid), tmp_path / "model", progress=False)
    for name in ("config.json", "generation_config.json", "evomerge_recipe.yaml", "README.md"):
        assert (out / name).exists(), name
    assert list(out.glob("*.safetensors"))
    card = (out / "README.md").read_text()
    assert "held-out" in card and "alone" in card
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness.evaluate import evaluate

    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tok("12+3=", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    backend = HFBackend(out, batch_size=64)
    recorded = view.results[view.candidates[cid].recipe_hash].results
    cfg = yaml.safe_load((runs / run / "config.yaml").read_text())
    for entry in cfg["tasks"]:
        task = load_task(entry["path"])
        got = evaluate(task, "heldout", backend)
        assert got.scores == recorded[task.name]["heldout"]["scores"]
    doc = yaml.safe_load((out / "evomerge_recipe.yaml").read_text())
    if run == "lineage":
        assert "candidate:" in str(doc["recipe"]) and len(doc["lineage"]) == 1  # model A's recipe
        assert not (out / "mergekit_config.yml").exists()
    else:
        assert "lineage" not in doc


def test_mergekit_config_gives_the_same_tensors(runs, tmp_path):
    """The exported mergekit config, read back with mergekit semantics, merges to the exported tensors."""
    import torch
    from safetensors.torch import load_file

    from evomerge.merge import run_merge
    from evomerge.plan import build_plan
    from evomerge.recipe.load import load_recipe

    cid, _ = _best(runs / "ps")
    out = export_candidate(runs / "ps", str(cid), tmp_path / "model", progress=False)
    mk = out / "mergekit_config.yml"
    assert mk.exists()
    recipe, root = load_recipe(mk)
    assert recipe.semantics == "mergekit"
    plan = build_plan(recipe, root)
    again = run_merge(plan, tmp_path / "again", progress=False)
    a = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in again.glob("*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_not_expressible_in_mergekit():
    from evomerge.recipe.load import parse_recipe

    groups = parse_recipe({"method": "ties", "base": "/b", "sources": [
        {"model": "/x", "parameters": {"weight": {"groups": [0.2, 0.4]}, "density": 0.5}}]})
    lineage = parse_recipe({"method": "slerp", "sources": [{"model": "candidate:" + "a" * 64}, {"model": "/y"}]})
    other = parse_recipe({"method": "model_stock", "base": "/b", "sources": [{"model": "/x"}, {"model": "/y"}]})
    assert to_mergekit(groups) is None and to_mergekit(lineage) is None and to_mergekit(other) is None
    plain = parse_recipe({"method": "ties", "base": "/b", "sources": [
        {"model": "/x", "parameters": {"weight": 0.5, "density": [{"filter": "attention", "value": 0.3},
                                                                   {"value": 0.6}]}}]})
    mk = to_mergekit(plain)
    assert mk["parameters"]["lambda"] == 1.0 and mk["models"][0]["parameters"]["density"][0]["filter"] == "self_attn"
