"""Search configs: strict validation with errors naming the key; paths resolved against the file."""

from pathlib import Path

import pytest
import yaml

from evomerge.errors import RecipeError
from evomerge.search.config import load_search_config, parse_search_config

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "fitness" / "zoo"


def raw(zoo, **over):
    data = {
        "name": "t",
        "seed": 1,
        "run_dir": "run",
        "models": {"base": str(zoo["base"]), "sources": [str(zoo["e1"]), str(zoo["e2"])]},
        "space": {"kind": "parameters", "method": "ties", "layer_groups": 2},
        "tasks": [{"path": str(TASKS / "add.yaml")}, {"path": str(TASKS / "reverse.yaml"), "weight": 2}],
        "optimizer": {"name": "cmaes"},
        "budget": {"evaluations": 10},
    }
    data.update(over)
    return data


def test_valid_config_resolves_paths(zoo, tmp_path):
    cfg_path = tmp_path / "sub" / "search.yaml"
    cfg_path.parent.mkdir()
    data = raw(zoo)
    data["tasks"] = [{"path": "../add.yaml"}]
    (tmp_path / "add.yaml").write_text(
        (TASKS / "add.yaml").read_text().replace("data/add.jsonl", str(TASKS / "data/add.jsonl"))
    )
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_search_config(cfg_path)
    assert cfg.run_dir == str((cfg_path.parent / "run").resolve())
    assert cfg.tasks[0].path == str((tmp_path / "add.yaml").resolve())
    assert cfg.space.layer_groups == 2
    assert cfg.evaluation.max_retries == 2
    assert len(cfg.config_hash()) == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"spaec": {}}, "spaec"),
        (
            {"space": {"kind": "parameters", "method": "ties", "layer_groups": 0}},
            "space.parameters.layer_groups",
        ),
        ({"space": {"kind": "genes"}}, "space"),
        ({"budget": {}}, "evaluations"),
        ({"budget": {"wall_time": "8 parsecs"}}, "duration"),
        ({"budget": {"evaluations": -1}}, "budget.evaluations"),
        ({"tasks": []}, "tasks"),
        ({"optimizer": {"name": "cmaes", "setings": {}}}, "setings"),
        ({"space": {"kind": "models"}}, "m2n2"),
        ({"evaluation": {"max_retries": 100}}, "max_retries"),
    ],
)
def test_bad_configs_name_the_key(zoo, tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        parse_search_config(raw(zoo, **change), tmp_path)


def test_missing_paths_are_named(zoo, tmp_path):
    data = raw(zoo)
    data["models"] = {"base": str(tmp_path / "nope"), "sources": [str(zoo["e1"])]}
    with pytest.raises(RecipeError, match=r"models\.base.*does not exist"):
        parse_search_config(data, tmp_path)
    data = raw(zoo)
    data["models"]["sources"] = [str(tmp_path)]
    with pytest.raises(RecipeError, match=r"models\.sources\[0\].*not a checkpoint"):
        parse_search_config(data, tmp_path)
    data = raw(zoo)
    data["tasks"] = [{"path": "missing.yaml"}]
    with pytest.raises(RecipeError, match=r"tasks\[0\]\.path"):
        parse_search_config(data, tmp_path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_search_config(tmp_path / "nope.yaml")


def test_durations(zoo, tmp_path):
    for text, seconds in (("90m", 5400.0), ("8h", 28800.0), (120, 120.0), ("1.5d", 129600.0)):
        cfg = parse_search_config(raw(zoo, budget={"wall_time": text}), tmp_path)
        assert cfg.budget.wall_time == seconds


def test_shipped_search_configs_parse_structurally():
    from evomerge.search.config import SearchConfig

    for path in sorted((REPO / "recipes" / "search").glob("*.yaml")):
        SearchConfig.model_validate(yaml.safe_load(path.read_text()))
