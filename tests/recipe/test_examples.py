from pathlib import Path

import pytest

from evomerge.recipe import load_recipe

EXAMPLES = sorted((Path(__file__).parents[2] / "recipes" / "examples").rglob("*.yaml"))  # search/ holds search configs


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe, _ = load_recipe(path)
    assert recipe.models()


def test_examples_exist():
    assert len(EXAMPLES) >= 4
