"""The search config (YAML): models, search space, fitness tasks, optimizer, budget, seed, run directory.

Paths in the file are relative to the file. ``load_search_config`` resolves them to absolute paths, so a
config copied into a run directory means the same thing wherever it is read from. Validation is strict:
an unknown key, a wrong type or an out-of-range value is a RecipeError naming the key and the file.

Example (recipes/search/zoo_cmaes.yaml)::

    name: zoo-ties-cmaes
    seed: 0
    run_dir: ../../runs/zoo-ties-cmaes
    models: {base: ../../zoo/base, sources: [../../zoo/experts/add, ../../zoo/experts/reverse]}
    space: {kind: parameters, method: ties, layer_groups: 3}
    tasks:
      - {path: ../../fitness/zoo/add.yaml}
      - {path: ../../fitness/zoo/reverse.yaml, weight: 1.0}
    optimizer: {name: cmaes, settings: {popsize: 8}}
    budget: {evaluations: 64}
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import RecipeError
from evomerge.recipe.errors import explain


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Models(_Strict):
    base: str | None = Field(None, description="the common base checkpoint (task-vector methods need it)")
    sources: list[str] = Field(min_length=1, description="the fine-tuned checkpoints to merge")


class ParameterSpaceConfig(_Strict):
    """Merge coefficients: per model, per layer group (and optionally per component), weights and densities."""

    kind: Literal["parameters"]
    method: str | list[str] = Field(description="a merge method, or a list to search over")
    layer_groups: int = Field(1, ge=1, description="contiguous layer groups with their own genes")
    components: list[str] | None = Field(None, description="separate genes per component, e.g. [attention, mlp]")
    genes: dict[str, tuple[float, float]] | None = Field(None, description="searched parameters and ranges")
    fixed: dict[str, float | bool] = Field(default_factory=dict, description="parameters held constant")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class DataFlowSpaceConfig(_Strict):
    """The layer path over the stacked layers of two models, with a scale per slot (folded into weights)."""

    kind: Literal["dataflow"]
    model_a: str = Field(description="checkpoint, or a recipe file (e.g. a parameter-space result)")
    model_b: str
    repeats: int = Field(3, ge=1, le=16)
    scale: tuple[float, float] = (0.5, 1.5)
    cost_objective: bool = Field(False, description="add the path length as an objective to minimise")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None

    @model_validator(mode="after")
    def _scale(self):
        lo, hi = self.scale
        if not 0 < lo < hi:
            raise ValueError(f"scale must satisfy 0 < low < high, got {list(self.scale)}")
        return self


class ModelSpaceConfig(_Strict):
    """Model space (M2N2 over models): children are layer-ordered crossovers of two archive members."""

    kind: Literal["models"]


Space = Annotated[ParameterSpaceConfig | DataFlowSpaceConfig | ModelSpaceConfig, Field(discriminator="kind")]


class TaskEntry(_Strict):
    path: str = Field(description="a fitness task YAML file")
    weight: float = Field(1.0, ge=0.0, description="weight in the scalar fitness (weighted sum of means)")
    search_split: str = "search"
    heldout_split: str | None = Field("heldout", description="null: no held-out scores for this task")


class Evaluation(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"
    dtype: str | None = None
    batch_size: int = Field(64, ge=1)
    max_retries: int = Field(2, ge=0, le=20, description="retries of a failing candidate before it is failed")
    heldout: Literal["every", "none"] = Field("every", description="score held-out splits for every candidate")
    baselines: bool = Field(True, description="score each source alone and default merges first, for comparison")
    backend_options: dict[str, Any] = Field(default_factory=dict, description="extra backend keyword arguments")


class Workers(_Strict):
    """Where candidates are evaluated: Ray actors (a local cluster unless an address is given) or this process."""

    ray: bool = Field(True, description="false: evaluate in this process, one candidate at a time")
    address: str | None = Field(None, description="an existing Ray cluster (else RAY_ADDRESS, else local)")
    count: int | None = Field(None, ge=1, description="evaluator actors; null: as many as resources allow")
    cpus: float = Field(1.0, ge=0, description="CPUs per actor")
    gpus: float = Field(0.0, ge=0, description="GPUs per actor")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor")
    max_redispatch: int = Field(3, ge=0, description="re-dispatches of a candidate whose worker died")
    queue: int | None = Field(None, ge=0, le=8, description=(
        "candidates sent ahead to each actor, waiting behind the one it evaluates, so it never waits for "
        "the driver between candidates; null: 1 for optimizers whose asks never wait on a generation "
        "(random, m2n2), 0 for generational ones (cmaes, nsga2), where work bound to a busy actor could "
        "leave the others idle at a generation's end"))


class Optimizer(_Strict):
    name: str
    settings: dict[str, Any] = Field(default_factory=dict)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


class Budget(_Strict):
    evaluations: int | None = Field(None, ge=1, description="candidates evaluated (cache hits are free)")
    wall_time: float | None = Field(None, gt=0, description="seconds of search, summed over resumes ('8h' ok)")

    @field_validator("wall_time", mode="before")
    @classmethod
    def _duration(cls, value):
        if isinstance(value, str):
            m = _DURATION.match(value)
            if not m:
                raise ValueError(f"'{value}' is not a duration (e.g. 3600, '90m', '8h')")
            return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return value

    @model_validator(mode="after")
    def _some(self):
        if self.evaluations is None and self.wall_time is None:
            raise ValueError("give 'evaluations' and/or 'wall_time'")
        return self


class SearchConfig(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    run_dir: str | None = Field(None, description="where the run lives (journal, snapshots, cache)")
    models: Models
    space: Space
    tasks: list[TaskEntry] = Field(min_length=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    workers: Workers = Field(default_factory=Workers)
    optimizer: Optimizer
    budget: Budget

    @model_validator(mode="after")
    def _consistent(self):
        names = [Path(t.path).resolve() for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("a task file is listed twice")
        if all(t.weight == 0 for t in self.tasks):
            raise ValueError("every task has weight 0: the scalar fitness would be constant")
        if self.space.kind == "models" and self.optimizer.name != "m2n2":
            raise ValueError("space kind 'models' is searched by the m2n2 optimizer only")
        return self

    def config_hash(self) -> str:
        """SHA-256 of the config's content (paths already absolute)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _absolute(data: dict, root: Path) -> dict:
    """The raw mapping with every path made absolute against ``root`` (before validation)."""

    def fix(p):
        return str((root / p).resolve()) if isinstance(p, str) and p else p

    out = dict(data)
    if isinstance(out.get("models"), dict):
        models = dict(out["models"])
        if "base" in models:
            models["base"] = fix(models["base"])
        if isinstance(models.get("sources"), list):
            models["sources"] = [fix(s) for s in models["sources"]]
        out["models"] = models
    if isinstance(out.get("space"), dict):
        space = dict(out["space"])
        for key in ("model_a", "model_b"):
            if key in space:
                space[key] = fix(space[key])
        out["space"] = space
    if isinstance(out.get("tasks"), list):
        out["tasks"] = [{**t, "path": fix(t.get("path"))} if isinstance(t, dict) else t for t in out["tasks"]]
    if isinstance(out.get("run_dir"), str):
        out["run_dir"] = fix(out["run_dir"])
    return out


def parse_search_config(data: object, root: Path, where: str = "search config", *,
                        check_paths: bool = True) -> SearchConfig:
    """Validate a parsed YAML mapping; relative paths resolve against ``root``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a search config must be a mapping, got {type(data).__name__}")
    try:
        config = SearchConfig.model_validate(_absolute(data, root))
    except ValidationError as e:
        raise explain(e, SearchConfig, where) from None
    if check_paths:
        _check_paths(config, where)
    return config


def load_search_config(path: str | Path, *, check_paths: bool = True) -> SearchConfig:
    """Read and validate a search config file (``check_paths=False``: for reading a finished run whose
    models or tasks have moved)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"search config '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    return parse_search_config(data, p.resolve().parent, str(p), check_paths=check_paths)


def _check_paths(config: SearchConfig, where: str) -> None:
    models = ([config.models.base] if config.models.base else []) + list(config.models.sources)
    if config.space.kind == "dataflow":
        models += [config.space.model_a, config.space.model_b]
    for key, m in zip(_model_keys(config), models, strict=True):
        p = Path(m)
        if not p.exists():
            raise RecipeError(f"{where}: {key}: '{m}' does not exist")
        if p.is_dir() and not (p / "config.json").is_file():
            raise RecipeError(f"{where}: {key}: '{m}' is not a checkpoint directory (no config.json)")
    for i, t in enumerate(config.tasks):
        if not Path(t.path).is_file():
            raise RecipeError(f"{where}: tasks[{i}].path: '{t.path}' does not exist")


def _model_keys(config: SearchConfig) -> list[str]:
    keys = ["models.base"] if config.models.base else []
    keys += [f"models.sources[{i}]" for i in range(len(config.models.sources))]
    if config.space.kind == "dataflow":
        keys += ["space.model_a", "space.model_b"]
    return keys
