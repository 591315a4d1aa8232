"""Building the zoo: layout, caching by config hash, refusal to overwrite foreign folders, determinism."""

import json
import time

import pytest

from evomerge.zoo import build
from evomerge.zoo.build import ZooConfig, build_zoo, read_manifest, zoo_config
from evomerge.zoo.skills import SKILLS, task_files
from evomerge.zoo.train import ModelSize, Schedule


def tiny_config(seed: int = 0, steps: int = 3) -> ZooConfig:
    """A zoo that trains a few steps: for checking the machinery, not the skills."""
    stage = Schedule(steps=steps, lr=1e-3, batch_size=8, warmup=1)
    return ZooConfig(
        seed=seed, size=ModelSize(hidden=32, layers=1, intermediate=64, heads=2), base=stage,
        experts=dict.fromkeys(SKILLS, stage),
    )  # fmt: skip


def test_layout_and_manifest(tmp_path):
    paths = build_zoo(tmp_path / "z", config=tiny_config())
    assert list(paths.models) == ["base", *SKILLS]
    for path in paths.models.values():
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    for rel, content in task_files().items():
        assert (paths.root / "tasks" / rel).read_bytes() == content
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["config_hash"] == paths.config_hash == tiny_config().digest()
    assert set(manifest["files"]) >= {
        "base/model.safetensors",
        "tasks/add.yaml",
        "experts/lexicon/config.json",
    }
    assert read_manifest(paths.root) == manifest


def test_same_seed_same_bytes_and_a_rebuild_is_a_no_op(tmp_path):
    first = build_zoo(tmp_path / "a", config=tiny_config())
    second = build_zoo(tmp_path / "b", config=tiny_config())
    files = json.loads(first.manifest.read_text())["files"]
    assert files == json.loads(second.manifest.read_text())["files"]
    other = build_zoo(tmp_path / "c", config=tiny_config(seed=1))
    assert (
        json.loads(other.manifest.read_text())["files"]["base/model.safetensors"]
        != files["base/model.safetensors"]
    )

    stamp = first.manifest.stat().st_mtime_ns
    again = build_zoo(tmp_path / "a", config=tiny_config())
    assert again == first and first.manifest.stat().st_mtime_ns == stamp


def test_a_changed_config_or_file_rebuilds(tmp_path, monkeypatch):
    paths = build_zoo(tmp_path / "z", config=tiny_config())
    trained = []
    real = build._train_all
    monkeypatch.setattr(
        build, "_train_all", lambda root, config: trained.append(config) or real(root, config)
    )

    build_zoo(tmp_path / "z", config=tiny_config())
    assert trained == []
    (paths.experts["add"] / "model.safetensors").write_bytes(b"torn")
    assert read_manifest(paths.root) is None
    build_zoo(tmp_path / "z", config=tiny_config())
    assert len(trained) == 1 and read_manifest(paths.root) is not None
    rebuilt = build_zoo(tmp_path / "z", config=tiny_config(steps=4))
    assert len(trained) == 2 and rebuilt.config_hash == tiny_config(steps=4).digest()


def test_refuses_a_folder_that_is_not_a_zoo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        build_zoo(tmp_path, config=tiny_config())
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="give a schedule for each of"):
        build_zoo(
            tmp_path / "z",
            config=ZooConfig(0, tiny_config().size, tiny_config().base, {"x": tiny_config().base}),
        )


def test_presets():
    quick, full = zoo_config(quick=True), zoo_config()
    assert set(quick.experts) == set(full.experts) == set(SKILLS)
    assert quick.digest() != full.digest() != zoo_config(seed=1).digest()
    assert quick.size.hidden <= full.size.hidden and quick.size.layers <= full.size.layers


def test_quick_build_models_load_and_main_reuses_it(quick_zoo, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(quick_zoo.experts["add"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(quick_zoo.experts["add"], local_files_only=True)
    assert (
        model.config.model_type == "llama" and model.config.hidden_size == zoo_config(quick=True).size.hidden
    )
    assert tok.decode(tok("rev abc=")["input_ids"], skip_special_tokens=True) == "rev abc="

    start = time.perf_counter()
    assert build.main([str(quick_zoo.root), "--quick"]) == 0
    assert time.perf_counter() - start < 10  # cached: no training
    assert str(quick_zoo.experts["lexicon"]) in capsys.readouterr().out


@pytest.mark.slow
def test_quick_build_is_bitwise_deterministic(quick_zoo, tmp_path):
    again = build_zoo(tmp_path / "again", quick=True)
    assert (
        json.loads(again.manifest.read_text())["files"] == json.loads(quick_zoo.manifest.read_text())["files"]
    )
