"""From a search config to the parts the loop drives: tasks, search space, optimizer, evaluator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import RecipeError
from evomerge.recipe.schema import Recipe, Source
from evomerge.search.config import SearchConfig
from evomerge.search.evaluator import InProcessEvaluator, ScoredTask
from evomerge.search.store import CACHE
from evomerge.search.types import CANDIDATE_PREFIX, Optimizer, candidate_ref


def num_layers_of(model: str) -> int:
    """Layers of a checkpoint (its config, read by the checkpoint reader; CheckpointError names the problem)."""
    from evomerge.checkpoint.reader import Checkpoint

    with Checkpoint(model) as ck:
        return ck.num_layers


@dataclass
class Search:
    """The loaded parts of a search."""

    config: SearchConfig
    run_dir: Path
    tasks: list[ScoredTask]
    space: Any | None  # a SearchSpace (None in model space)
    optimizer: Optimizer
    reference: str  # the checkpoint the evaluator keeps resident
    cost_objective: bool = False
    recipes: dict[str, Recipe] = field(default_factory=dict)  # lineage store: recipe hash -> recipe

    def remember(self, recipe_hash: str, recipe: Recipe | dict) -> None:
        """Make a candidate's recipe resolvable by later lineage recipes."""
        if recipe_hash not in self.recipes:
            if isinstance(recipe, dict):
                from evomerge.recipe.load import parse_recipe

                recipe = parse_recipe(recipe, f"candidate {recipe_hash[:12]}")
            self.recipes[recipe_hash] = recipe

    def baselines(self) -> list[tuple[str, Recipe]]:
        """(name, recipe) of what every search is compared with: each source alone, and default merges."""
        from evomerge.search.space import identity_recipe

        models = self.config.models
        cfg = self.config.space
        sources = [cfg.model_a, cfg.model_b] if cfg.kind == "dataflow" else list(models.sources)
        out = []
        for m in sources:
            if m.startswith(CANDIDATE_PREFIX) or Path(m).is_file():
                continue  # a recipe given as model A: not a plain source
            name = f"{Path(m).name} alone"
            out.append((name if name not in dict(out) else f"{m} alone", identity_recipe(m)))
        if cfg.kind != "dataflow" and len(models.sources) > 1:
            n = len(models.sources)
            if models.base:
                out.append(("task arithmetic (uniform 1/n)", Recipe(
                    method="task_arithmetic", base=models.base,
                    sources=[Source(model=m, parameters={"weight": round(1 / n, 6)}) for m in models.sources])))
                out.append(("TIES (weight 1, density 0.5)", Recipe(
                    method="ties", base=models.base,
                    sources=[Source(model=m, parameters={"weight": 1.0, "density": 0.5}) for m in models.sources])))
            else:
                out.append(("average (uniform)", Recipe(method="linear", sources=[Source(model=m)
                                                                                 for m in models.sources])))
        return out

    def make_evaluator(self) -> InProcessEvaluator:
        return _evaluator(self.config, self.run_dir, self.tasks, self.reference, self.recipes)


def _evaluator(config: SearchConfig, run_dir: Path, tasks, reference: str, recipes: dict[str, Recipe]):
    from evomerge.search.lineage import LineageResolver

    ev = config.evaluation
    return InProcessEvaluator(tasks, reference, backend=ev.backend, device=ev.device, dtype=ev.dtype,
                              batch_size=ev.batch_size, heldout=ev.heldout == "every",
                              backend_options=ev.backend_options,
                              resolver=LineageResolver(recipes, run_dir / CACHE, Path("/")),
                              scratch=run_dir / "scratch")


def evaluator_for(config: SearchConfig, run_dir: Path, recipes: dict[str, Recipe]) -> InProcessEvaluator:
    """An evaluator for ``config`` without building its optimizer (what a remote worker needs); lineage
    recipes are looked up in ``recipes``, which the caller keeps filling."""
    recipes.update(config_recipes(config))
    return _evaluator(config, run_dir, load_tasks(config), _reference(config), recipes)


def _reference(config: SearchConfig) -> str:
    """The checkpoint an evaluator keeps resident (candidates of its shape are merged into it in place)."""
    if config.space.kind == "dataflow":
        return config.space.model_b
    if config.space.kind == "parameters" and config.models.base:
        return config.models.base
    return config.models.sources[0]


def config_recipes(config: SearchConfig) -> dict[str, Recipe]:
    """Recipes the config itself names as models (a data-flow model A given as a recipe file)."""
    if config.space.kind == "dataflow" and Path(config.space.model_a).is_file():
        from evomerge.recipe.load import load_recipe

        recipe, root = load_recipe(config.space.model_a)
        recipe = _absolute_recipe(recipe, root)
        return {recipe.content_hash(): recipe}
    return {}


def load_tasks(config: SearchConfig) -> list[ScoredTask]:
    from evomerge.fitness.task import load_task

    tasks = []
    for i, entry in enumerate(config.tasks):
        task = load_task(entry.path)
        for key, split in (("search_split", entry.search_split), ("heldout_split", entry.heldout_split)):
            if split is not None:
                try:
                    task.items(split)
                except (KeyError, ValueError) as e:
                    raise RecipeError(f"tasks[{i}].{key}: {e}") from None
        tasks.append(ScoredTask(task, entry.weight, entry.search_split, entry.heldout_split))
    names = [t.task.name for t in tasks]
    if len(set(names)) != len(names):
        raise RecipeError(f"two tasks share a name: {names}")
    return tasks


def build_search(config: SearchConfig, run_dir: Path) -> Search:
    """Load tasks, build the space and the optimizer (all validated) for ``config``."""
    from evomerge.search.optimizers import make_optimizer

    tasks = load_tasks(config)
    space_cfg = config.space
    models = config.models
    recipes: dict[str, Recipe] = {}
    space = None
    cost = False
    opt_kwargs: dict[str, Any] = {}
    if space_cfg.kind == "parameters":
        from evomerge.search.space import ParameterSpace

        space = ParameterSpace(method=space_cfg.method, base=models.base, models=list(models.sources),
                               num_layers=num_layers_of(models.sources[0]), layer_groups=space_cfg.layer_groups,
                               components=space_cfg.components, genes=space_cfg.genes, fixed=space_cfg.fixed,
                               dtype=space_cfg.dtype, seed=config.seed)
    elif space_cfg.kind == "dataflow":
        from evomerge.search.dataflow import DataFlowSpace

        model_a, layers_from = space_cfg.model_a, space_cfg.model_a
        given = config_recipes(config)
        if given:  # model A is a recipe (e.g. a parameter-space result): a lineage source
            [(h, recipe)] = given.items()
            recipes[h] = recipe
            model_a = candidate_ref(h)
            layers_from = recipe.models()[0]
        space = DataFlowSpace(model_a, space_cfg.model_b, num_layers=num_layers_of(layers_from),
                              repeats=space_cfg.repeats, scale=tuple(space_cfg.scale), dtype=space_cfg.dtype)
        cost = space_cfg.cost_objective
    else:
        from evomerge.search.lineage import crossover_recipe
        from evomerge.search.space import identity_recipe

        layers = num_layers_of(models.sources[0])
        opt_kwargs = {"initial": [(m, identity_recipe(m)) for m in models.sources],
                      "make_child": lambda a, b, split, mix: crossover_recipe(a, b, layers, split, mix),
                      "num_layers": layers}
    optimizer = make_optimizer(config.optimizer.name, config.optimizer.settings, space=space, seed=config.seed,
                               n_objectives=len(tasks) + int(cost), **opt_kwargs)
    search = Search(config, run_dir, tasks, space, optimizer, _reference(config), cost, recipes)
    return search


def _absolute_recipe(recipe: Recipe, root: Path) -> Recipe:
    """``recipe`` with every model path made absolute against ``root`` (lineage refs left alone)."""

    def fix(m: str | None) -> str | None:
        if m is None or m.startswith(CANDIDATE_PREFIX):
            return m
        return str((root / m).resolve())

    def fix_sources(sources):
        return [s.model_copy(update={"model": fix(s.model)}) for s in sources]

    update: dict[str, Any] = {"base": fix(recipe.base)}
    if recipe.tokenizer_source and recipe.tokenizer_source not in ("base", "union"):
        update["tokenizer_source"] = fix(recipe.tokenizer_source)
    if recipe.sources is not None:
        update["sources"] = fix_sources(recipe.sources)
    if recipe.slices is not None:
        update["slices"] = [sl.model_copy(update={"sources": fix_sources(sl.sources)}) for sl in recipe.slices]
    return recipe.model_copy(update=update)
