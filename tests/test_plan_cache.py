"""Plan skeletons: a plan built on a cached skeleton is the plan ``build_plan`` makes from scratch, for every
recipe of the structure, with every error; a changed source or another structure never reuses a skeleton."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.checkpoint.reader import CheckpointCache
from evomerge.errors import CheckpointError, RecipeError
from evomerge.merge import merge_tensor
from evomerge.plan import SkeletonCache, build_plan
from evomerge.recipe.schema import Recipe, Slice, Source
from tests.search.test_evaluator import replace_by_rename, rewrite_in_place


def plan_both(recipe, root, cache, skeletons):
    """The plan through the caches, and the plan made from scratch."""
    cached = build_plan(recipe, root, checkpoints=cache, skeletons=skeletons)
    return cached, build_plan(recipe, root)


def assert_same_plan(cached, fresh, *, merged=True):
    assert len(cached.jobs) == len(fresh.jobs)
    for a, b in zip(cached.jobs, fresh.jobs, strict=True):
        assert (a.out, a.inputs, a.base, a.copy, a.vocab_rows) == (
            b.out,
            b.inputs,
            b.base,
            b.copy,
            b.vocab_rows,
        )
        assert (a.model_params, a.global_params, a.ctx) == (b.model_params, b.global_params, b.ctx), (
            a.out.name
        )
    assert cached.jobs == fresh.jobs
    assert (cached.model_names, cached.donor, cached.layer_origin, cached.out_dtype, cached.notes) == (
        fresh.model_names,
        fresh.donor,
        fresh.layer_origin,
        fresh.out_dtype,
        fresh.notes,
    )
    if merged:
        for a, b in zip(cached.jobs, fresh.jobs, strict=True):
            assert torch.equal(merge_tensor(cached, a), merge_tensor(fresh, b)), a.out.name


@pytest.fixture
def caches():
    cache = CheckpointCache()
    yield cache, SkeletonCache()
    cache.close()


# ------------------------------------------------------------------ recipes: one structure, values by k


def task_arithmetic(zoo, k, e2="e2"):
    """Per-layer lists, layer groups and a conditional; keys move between levels and come and go with k."""
    first = {"weight": [0.1 * k, 0.5, 1.0 - 0.2 * k]} if k % 2 == 0 else {}
    top = {"weight": [{"filter": "mlp", "value": 0.2 + k / 10}, {"value": 0.9}], "lam": [1.0, 0.8 + k / 10]}
    if k == 3:
        top["normalize"] = True
    return Recipe.model_validate(
        {
            "method": "task_arithmetic",
            "base": str(zoo["base"]),
            "seed": k,
            "sources": [
                {"model": str(zoo["e1"]), "parameters": first},
                {"model": str(zoo[e2]), "parameters": {"weight": {"groups": [0.3, 0.6 + k / 10]}}},
            ],
            "parameters": top,
        }
    )


def ties(zoo, k):
    return Recipe.model_validate(
        {
            "method": "ties",
            "base": str(zoo["base"]),
            "sources": [
                {"model": str(zoo["e1"]), "parameters": {"weight": 0.6, "density": [0.2 + k / 10, 0.9]}},
                {
                    "model": str(zoo["e2"]),
                    "parameters": {
                        "weight": 0.4 + k / 10,
                        "density": [{"filter": "attention", "value": 0.3 + k / 10}, {"value": 0.7}],
                    },
                },
            ],
        }
    )


def slices_with_base(zoo, k):
    """A data-flow recipe: six layers, the base among each slice's sources."""
    base = str(zoo["base"])
    return Recipe.model_validate(
        {
            "method": "task_arithmetic",
            "base": base,
            "slices": [
                {
                    "sources": [
                        {"model": base, "layer_range": [0, 4]},
                        {
                            "model": str(zoo["e1"]),
                            "layer_range": [0, 4],
                            "parameters": {"weight": [0.5, 1 + k / 10]},
                        },
                    ]
                },
                {
                    "sources": [
                        {"model": base, "layer_range": [2, 4]},
                        {"model": str(zoo["e2"]), "layer_range": [2, 4]},
                    ],
                    "parameters": {"weight": 0.3 * k},
                },
            ],
        }
    )


def mergekit_passthrough(zoo, k):
    """Filters match the source's tensor names under mergekit semantics: layer 1 of e2 lands at layer 3."""
    return Recipe.model_validate(
        {
            "method": "passthrough",
            "semantics": "mergekit",
            "slices": [
                {"sources": [{"model": str(zoo["e1"]), "layer_range": [0, 3]}]},
                {
                    "sources": [
                        {
                            "model": str(zoo["e2"]),
                            "layer_range": [1, 4],
                            "parameters": {
                                "scale": [{"filter": "layers.1.", "value": 0.5 + k / 10}, {"value": 1.0}]
                            },
                        }
                    ]
                },
            ],
        }
    )


def passthrough_with_donor(zoo, k):
    """One-model slices naming a base: tensors outside the layer stack are the base's own."""
    return Recipe.model_validate(
        {
            "method": "passthrough",
            "base": str(zoo["base"]),
            "slices": [
                {"sources": [{"model": str(zoo["e1"]), "layer_range": [0, 2]}]},
                {
                    "sources": [{"model": str(zoo["e2"]), "layer_range": [2, 4]}],
                    "parameters": {"scale": 1 - k / 10},
                },
            ],
            "parameters": {"scale": [{"filter": "embedding", "value": 0.9 + k / 10}, {"value": 1.0}]},
        }
    )


def vocab_mismatch(zoo, k):
    return Recipe.model_validate(
        {
            "method": "linear",
            "sources": [
                {"model": str(zoo["bigvocab"]), "parameters": {"weight": [1.0, 0.5 + k / 10]}},
                {"model": str(zoo["base"]), "parameters": {"weight": 0.5}},
            ],
        }
    )


FAMILIES = [
    task_arithmetic,
    ties,
    slices_with_base,
    mergekit_passthrough,
    passthrough_with_donor,
    vocab_mismatch,
]


def test_a_skeletons_notes_are_logged_once_and_kept_on_every_plan(zoo, tmp_path, caches, caplog):
    cache, skeletons = caches
    with caplog.at_level("WARNING", logger="evomerge.plan"):
        plans = [build_plan(vocab_mismatch(zoo, k), tmp_path, checkpoints=cache, skeletons=skeletons)
                 for k in range(3)]
    assert all(p.notes and p.notes == plans[0].notes for p in plans)
    assert [r.getMessage() for r in caplog.records] == plans[0].notes  # one structure: logged once


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_plans_of_one_structure_equal_plans_made_from_scratch(zoo, tmp_path, caches, family):
    cache, skeletons = caches
    for k in range(4):
        cached, fresh = plan_both(family(zoo, k), tmp_path, cache, skeletons)
        assert_same_plan(cached, fresh)
        fresh.close()
    assert skeletons.built == 1


def test_the_seed_is_the_plans_own(zoo, tmp_path, caches):
    cache, skeletons = caches
    recipe = ties(zoo, 0)
    for seed in (3, 4, None):
        cached = build_plan(recipe, tmp_path, seed=seed, checkpoints=cache, skeletons=skeletons)
        fresh = build_plan(recipe, tmp_path, seed=seed)
        assert {j.ctx.seed for j in cached.jobs} == {seed or 0}
        assert_same_plan(cached, fresh, merged=False)
        fresh.close()
    assert skeletons.built == 1


# ------------------------------------------------------------------ errors of a plan on a cached skeleton


def with_value(recipe, **parameters):
    """``recipe`` with the second source's parameters updated."""
    data = recipe.model_dump()
    data["sources"][1]["parameters"].update(parameters)
    return Recipe.model_validate(data)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"density": [{"filter": "layers.2.mlp.up_proj", "value": 1.5}, {"value": 0.5}]},
            RecipeError,
            r"parameters out of range for model '.*e2', tensor 'model.layers.2.mlp.up_proj.weight': density",
        ),
        (
            {"density": [0.5, 1.5]},
            RecipeError,
            r"out of range for model '.*e2', tensor 'model.layers.2\..*': density",
        ),
        ({"weight": []}, ValueError, "an empty list is not a parameter value"),
    ],
    ids=["one tensor", "deep layers", "empty list"],
)
def test_bad_parameters_on_a_cached_skeleton_raise_as_from_scratch(
    zoo, tmp_path, caches, change, error, message
):
    cache, skeletons = caches
    build_plan(ties(zoo, 0), tmp_path, checkpoints=cache, skeletons=skeletons)
    bad = with_value(ties(zoo, 1), **change)
    with pytest.raises(error, match=message) as cached:
        build_plan(bad, tmp_path, checkpoints=cache, skeletons=skeletons)
    with pytest.raises(error) as fresh:
        build_plan(bad, tmp_path)
    assert str(cached.value) == str(fresh.value)
    assert skeletons.built == 1


def test_a_bad_global_parameter_names_the_tensor(zoo, tmp_path, caches):
    cache, skeletons = caches
    good = task_arithmetic(zoo, 0)
    build_plan(good, tmp_path, checkpoints=cache, skeletons=skeletons)
    bad = Recipe.model_validate({**good.model_dump(), "parameters": {"lam": [1.0, 20.0]}})
    with pytest.raises(RecipeError, match=r"out of range for tensor 'model.layers.2\..*': lam") as cached:
        build_plan(bad, tmp_path, checkpoints=cache, skeletons=skeletons)
    with pytest.raises(RecipeError) as fresh:
        build_plan(bad, tmp_path)
    assert str(cached.value) == str(fresh.value)


def test_parameter_problems_come_before_a_missing_tensor(zoo, tmp_path, caches):
    """As from scratch: every parameter is checked (where its tensor exists) before missing tensors are
    reported, and a structure with a missing tensor keeps raising it."""
    cache, skeletons = caches
    e2 = shutil.copytree(zoo["e2"], tmp_path / "e2")
    sd = load_file(e2 / "model.safetensors")
    del sd["model.layers.1.mlp.gate_proj.weight"]
    save_file(sd, e2 / "model.safetensors", metadata={"format": "pt"})
    good = ties({**zoo, "e2": e2}, 0)
    for recipe, error in (
        (good, CheckpointError),
        (with_value(good, density=1.5), RecipeError),
        (good, CheckpointError),
    ):
        with pytest.raises(error) as cached:
            build_plan(recipe, tmp_path, checkpoints=cache, skeletons=skeletons)
        with pytest.raises(error) as fresh:
            build_plan(recipe, tmp_path)
        assert str(cached.value) == str(fresh.value)
    assert skeletons.built == 1


# ------------------------------------------------------------------ changed sources, other structures


@pytest.mark.parametrize("change", [rewrite_in_place, replace_by_rename], ids=["in place", "by rename"])
def test_a_source_changed_on_disk_gets_a_new_skeleton(zoo, tmp_path, caches, change):
    cache, skeletons = caches
    models = {**zoo, "e2": shutil.copytree(zoo["e2"], tmp_path / "e2")}
    weights = models["e2"] / "model.safetensors"
    original = load_file(weights)
    build_plan(task_arithmetic(models, 0), tmp_path, checkpoints=cache, skeletons=skeletons)

    # another shape: an error now
    change(weights, {**original, "model.layers.1.mlp.gate_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="differ in shape.*model.layers.1.mlp.gate_proj"):
        build_plan(task_arithmetic(models, 1), tmp_path, checkpoints=cache, skeletons=skeletons)
    assert skeletons.built == 2

    # a larger vocabulary: rows in common merged, as from scratch
    change(weights, load_file(zoo["bigvocab"] / "model.safetensors"))
    cached, fresh = plan_both(task_arithmetic(models, 2), tmp_path, cache, skeletons)
    assert_same_plan(cached, fresh)
    assert any(j.vocab_rows for j in cached.jobs) and cached.notes
    fresh.close()
    assert skeletons.built == 3


def test_a_tokenizer_changed_on_disk_is_checked_again(zoo, tmp_path, caches):
    cache, skeletons = caches
    e2 = shutil.copytree(zoo["e2"], tmp_path / "e2")
    recipe = Recipe.model_validate({**ties(zoo, 0).model_dump(), "tokenizer_source": "union"})
    recipe = Recipe.model_validate(
        {**recipe.model_dump(), "sources": [recipe.sources[0].model_dump(), {"model": str(e2)}]}
    )
    build_plan(recipe, tmp_path, checkpoints=cache, skeletons=skeletons)
    with open(e2 / "tokenizer.json", "r+b") as f:  # same file, same directory entry
        f.seek(0, os.SEEK_END)
        f.write(b" ")
    with pytest.raises(RecipeError, match="union with different tokenizers"):
        build_plan(recipe, tmp_path, checkpoints=cache, skeletons=skeletons)


def test_other_structures_get_their_own_skeletons(zoo, tmp_path, caches):
    cache, _ = caches

    def sliced(first, second):
        return Recipe(
            method="passthrough",
            slices=[
                Slice(sources=[Source(model=str(zoo["e1"]), layer_range=first)]),
                Slice(sources=[Source(model=str(zoo["e2"]), layer_range=second)]),
            ],
        )

    structures = [
        task_arithmetic(zoo, 0),
        task_arithmetic(zoo, 0, e2="e3"),  # another model
        ties(zoo, 0),  # another method
        Recipe.model_validate({**task_arithmetic(zoo, 0).model_dump(), "semantics": "mergekit"}),
        Recipe.model_validate({**task_arithmetic(zoo, 0).model_dump(), "dtype": "bfloat16"}),
        Recipe.model_validate({**task_arithmetic(zoo, 0).model_dump(), "tokenizer_source": str(zoo["e1"])}),
        linear(zoo),
        linear(zoo, base=str(zoo["e1"])),  # the base is read (job.base), though linear ignores it
        sliced((0, 3), (1, 4)),
        sliced((1, 4), (0, 3)),  # other layers
        sliced((0, 2), (2, 4)),  # other slice lengths
    ]
    skeletons = SkeletonCache(size=len(structures))
    for n, recipe in enumerate(structures + structures[::-1], start=1):
        cached, fresh = plan_both(recipe, tmp_path, cache, skeletons)
        assert_same_plan(cached, fresh, merged=False)
        fresh.close()
        assert skeletons.built == min(n, len(structures))


def linear(zoo, **fields):
    return Recipe(
        method="linear", sources=[Source(model=str(zoo["e1"])), Source(model=str(zoo["e2"]))], **fields
    )


def test_checks_of_the_structure_still_raise_after_a_cached_one(zoo, tmp_path, caches):
    cache, skeletons = caches
    build_plan(linear(zoo), tmp_path, checkpoints=cache, skeletons=skeletons)
    with pytest.raises(RecipeError, match="depth_scaling .* needs a method with a base"):
        build_plan(
            linear(zoo, depth_scaling={"alpha": 0.5}), tmp_path, checkpoints=cache, skeletons=skeletons
        )
    with pytest.raises(RecipeError, match="tokenizer_source: base, but the recipe has no base"):
        build_plan(linear(zoo, tokenizer_source="base"), tmp_path, checkpoints=cache, skeletons=skeletons)
    assert skeletons.built == 1


def test_skeletons_are_few(zoo, tmp_path):
    cache, skeletons = CheckpointCache(), SkeletonCache(size=1)
    try:
        for recipe in (ties(zoo, 0), task_arithmetic(zoo, 0), ties(zoo, 1)):
            build_plan(recipe, tmp_path, checkpoints=cache, skeletons=skeletons)
        assert skeletons.built == 3
    finally:
        cache.close()
    with pytest.raises(ValueError, match="size"):
        SkeletonCache(size=0)
    with pytest.raises(ValueError, match="CheckpointCache"):
        build_plan(ties(zoo, 0), tmp_path, skeletons=SkeletonCache())


def test_the_structure_key_knows_every_recipe_field():
    """A new recipe field is either part of a plan's structure (``evomerge.plan._structure``) or a value
    resolved per plan: this list changes with that decision."""
    assert set(Recipe.model_fields) == {
        "method",
        "base",
        "sources",
        "slices",
        "parameters",
        "depth_scaling",
        "dtype",
        "tokenizer_source",
        "seed",
        "semantics",
    }
    assert set(Source.model_fields) == {"model", "parameters", "layer_range"}
    assert set(Slice.model_fields) == {"sources", "parameters"}
