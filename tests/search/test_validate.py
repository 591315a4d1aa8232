"""`evomerge validate` on a real small model-space run (M2N2 on the quick zoo, lineage children included):
re-scoring reproduces the journal's held-out scores, drops are flagged, validation.json is written and the
journal is left alone."""

import argparse
import hashlib
import json
import shutil

import pytest

from evomerge.errors import EvomergeError
from evomerge.search.archive_view import load_archive, pareto_text
from evomerge.search.config import parse_search_config
from evomerge.search.run import start_run
from evomerge.search.validate import VALIDATION, add_validate_parser, select, validate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lineage_run(quick_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validate")
    data = {
        "name": "v", "seed": 2,
        "models": {"base": str(quick_zoo.base), "sources": [str(quick_zoo.experts[s]) for s in ("add", "reverse")]},
        "space": {"kind": "models"},
        "tasks": [{"path": str(quick_zoo.tasks[s])} for s in ("add", "reverse")],
        "optimizer": {"name": "m2n2", "settings": {"archive_size": 3}},
        "budget": {"evaluations": 7},
        "evaluation": {"batch_size": 64, "baselines": False},
        "workers": {"ray": False},
    }
    start_run(parse_search_config(data, tmp), tmp / "run", progress=False)
    return tmp / "run"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command(argv, capsys):
    parser = argparse.ArgumentParser(prog="evomerge")
    add_validate_parser(parser.add_subparsers())
    args = parser.parse_args(["validate", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_front_rescored_on_heldout_reproduces_the_journal(lineage_run, capsys):
    before = digest(lineage_run / "journal.jsonl")
    av = load_archive(lineage_run)
    front = select(av)
    assert {e.recipe_hash for e in front} == {e.recipe_hash for e in av.front()}
    text = command([str(lineage_run)], capsys)
    report = json.loads((lineage_run / VALIDATION).read_text())
    assert [r["id"] for r in report["candidates"]] == [e.id for e in front]
    assert report["split"] == "heldout" and report["selection"] == "search front" and report["drop"] == 0.1
    for r, e in zip(report["candidates"], front, strict=True):
        assert r["reproduced"] is True
        assert list(r["rescored"].values()) == pytest.approx(list(e.heldout))
        assert r["search_mean"] == pytest.approx(av.mean(e))
        assert r["drop"] == pytest.approx(av.mean(e) - av.mean(e, True))
        assert r["flagged"] == (r["drop"] > 0.1 + 1e-12)
    assert report["flagged"] == [r["id"] for r in report["candidates"] if r["flagged"]]
    assert f"wrote {lineage_run / VALIDATION}" in text and "same scores" in text
    assert digest(lineage_run / "journal.jsonl") == before  # never written


def test_lineage_children_are_rebuilt_from_the_runs_recipes_and_drops_flagged(lineage_run, capsys):
    av = load_archive(lineage_run)
    refs = [e for e in av.candidates if "candidate:" in json.dumps(av.run.candidates[e.id].recipe)]
    assert refs, "no child of a child in this run: nothing exercises lineage resolution"
    shutil.rmtree(lineage_run / "cache", ignore_errors=True)  # materializations must be rebuilt
    report = validate(lineage_run, top=len(av.candidates), drop=-1.0)
    assert len(report["candidates"]) == len(av.candidates) and report["selection"] == f"top {len(av.candidates)}"
    assert all("error" not in r and r["reproduced"] for r in report["candidates"])
    assert report["flagged"] == [r["id"] for r in report["candidates"]]  # every mean is above search - (-1)
    assert (lineage_run / "cache").is_dir()
    ranked = [r["search_mean"] for r in report["candidates"]]
    assert ranked == sorted(ranked, reverse=True)
    text = command([str(lineage_run), "--top", "2", "--drop", "-1"], capsys)
    assert text.count("DROP") == 2 and "2 flagged" in text


def test_another_split_and_a_tiny_threshold(lineage_run):
    av = load_archive(lineage_run)
    report = validate(lineage_run, split="search", top=3, drop=0.0)
    assert report["splits"] == {t: "search" for t in av.tasks}
    for r in report["candidates"]:
        assert r["drop"] == pytest.approx(0.0) and not r["flagged"]  # the same items score the same
    shifted = validate(lineage_run, top=3, drop=-1e-9)  # held-out at or below search: flagged
    assert [r["flagged"] for r in shifted["candidates"]] == [r["rescored_mean"] <= r["search_mean"]
                                                            for r in shifted["candidates"]]


def test_bad_requests(lineage_run, tmp_path):
    from evomerge.errors import TaskError

    with pytest.raises(TaskError, match="unknown split 'dev'"):
        validate(lineage_run, split="dev")
    moved = tmp_path / "moved"
    shutil.copytree(lineage_run, moved, ignore=shutil.ignore_patterns("cache"))
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace("/experts/add", "/experts/gone"))
    with pytest.raises(EvomergeError, match="does not exist"):
        validate(moved)
    assert "front" in pareto_text(load_archive(moved))  # still readable without its models
