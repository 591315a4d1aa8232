"""`evomerge pareto` on recorded runs (tests/search/data, made by make_recorded_run.py on the quick zoo):
the front against a brute-force dominance check, hypervolume over time, baselines, lineage, a run still in
flight, and the plot."""

import argparse
import json
import shutil
from pathlib import Path

import pytest

from evomerge.search.archive_view import MERGE, SOURCE, add_pareto_parser, load_archive, origin, pareto_text

DATA = Path(__file__).parent / "data"
M2N2, NSGA2 = DATA / "m2n2_run", DATA / "nsga2_run"


def brute_front(points: dict[str, tuple[float, ...]]) -> set[str]:
    def dominated(p, q):  # q dominates p
        return all(b >= a for a, b in zip(p, q, strict=True)) and any(b > a for a, b in zip(p, q, strict=True))

    return {k for k, p in points.items() if not any(dominated(p, q) for j, q in points.items() if j != k)}


def run_command(argv, capsys):
    parser = argparse.ArgumentParser(prog="evomerge")
    add_pareto_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("run", [M2N2, NSGA2])
def test_recorded_run_reads_without_its_models(run):
    av = load_archive(run)
    config = json.loads(json.dumps(av.config.model_dump(mode="json")))
    assert config["models"]["base"].startswith("/moved/") and not Path(config["models"]["base"]).exists()
    assert av.tasks == [f"zoo_{Path(t.path).stem}" for t in av.config.tasks]
    assert av.stems == [Path(t.path).stem for t in av.config.tasks]
    assert len(av.candidates) == av.config.budget.evaluations and not av.run.in_flight()
    assert [e.order for e in av.candidates] == sorted(e.order for e in av.candidates)
    kinds = {b.name: b.kind for b in av.baselines}
    assert {n for n, k in kinds.items() if k == SOURCE} == {f"{s} alone" for s in av.stems}
    assert {n for n, k in kinds.items() if k == MERGE} == {"task arithmetic (uniform 1/n)",
                                                           "TIES (weight 1, density 0.5)"}
    assert all(0 <= v <= 1 for e in av.candidates + av.baselines for v in (*e.search, *e.heldout))


@pytest.mark.parametrize("run", [M2N2, NSGA2])
@pytest.mark.parametrize("heldout", [False, True])
def test_front_is_exactly_the_non_dominated_candidates(run, heldout):
    av = load_archive(run)
    front = av.front(heldout)
    points = {e.recipe_hash: e.scores(heldout) for e in av.candidates}
    assert {e.recipe_hash for e in front} == brute_front(points)
    assert 0 < len(front) < len(av.candidates)


@pytest.mark.parametrize("run", [M2N2, NSGA2])
def test_hypervolume_history_is_non_decreasing_and_ends_at_the_front(run):
    from evomerge.search.pareto import hypervolume

    av = load_archive(run)
    for heldout in (False, True):
        hist = av.hypervolume_history(heldout)
        assert len(hist) == len(av.candidates)
        assert all(b >= a for a, b in zip(hist, hist[1:], strict=False))
        front = [e.scores(heldout) for e in av.front(heldout)]
        assert hist[-1] == pytest.approx(hypervolume(front, av.reference))
    if run == M2N2:  # this run improves its front; the first HV is the first candidate's box
        hist = av.hypervolume_history()
        assert hist[-1] > hist[0] > 0
        first = av.candidates[0].search
        assert hist[0] == pytest.approx(first[0] * first[1])


def test_table_rows_baselines_lineage_and_hypervolume_marks():
    av = load_archive(M2N2)
    text = pareto_text(av)
    lines = text.splitlines()
    front = av.front()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("id "))
    rows = [ln for ln in lines[header + 2:] if ln.strip()][: len(front) + 2]
    assert [r.split()[0] for r in rows[: len(front)]] == [
        str(e.id) for e in sorted(front, key=lambda e: -av.mean(e))]
    for e in front:
        row = next(r for r in rows if r.split()[0] == str(e.id))
        assert "m2n2" in row and f"{e.search[0]:.3f}/{e.heldout[0]:.3f}" in row and origin(e) in row
        if e.parents:
            assert ", ".join(av.id_of(p) for p in e.parents) in row
    children = [e for e in front if e.parents]
    assert children, "the recorded M2N2 front has crossover children"
    assert all(av.id_of(p).isdigit() for e in children for p in e.parents)  # parents named by candidate id
    best_source = av.best_baseline(SOURCE)
    assert best_source.name == "add alone"  # held-out mean 0.48 against reverse's 0.46
    assert any(r.startswith("--") and "best source alone" in r and "add alone" in r for r in rows)
    assert any("best default merge" in r and "TIES (weight 1, density 0.5)" in r for r in rows)
    assert "10% (2)" in text and "25% (4)" in text and "50% (7)" in text and "100% (14)" in text
    hist = av.hypervolume_history()
    assert f"{hist[-1]:.4f}" in next(ln for ln in lines if ln.startswith("search "))
    assert "finished (budget)" in text


def test_repeated_asks_share_one_entry():
    av = load_archive(NSGA2)  # NSGA-II asked one genome twice: evaluated once, both ids kept
    shared = [e for e in av.candidates if len(e.ids) > 1]
    assert shared and all(e.id == min(e.ids) for e in shared)
    assert len({e.recipe_hash for e in av.candidates}) == len(av.candidates)
    assert origin(av.candidates[0]) == "gen 0 #0"


def test_unknown_task_names_list_the_valid_ones():
    from evomerge.errors import EvomergeError

    av = load_archive(M2N2)
    assert av.task_index("reverse") == av.task_index("zoo_reverse") == 1
    with pytest.raises(EvomergeError, match=r"zoo_add \(or add\), zoo_reverse \(or reverse\)"):
        av.task_index("lexicon")


def test_a_run_still_in_flight(tmp_path, capsys):
    """Cut the journal after the 5th result, leaving later asks without results and a torn last line."""
    run = tmp_path / "run"
    shutil.copytree(M2N2, run)
    lines = (run / "journal.jsonl").read_text().splitlines(keepends=True)
    results = [i for i, ln in enumerate(lines) if '"kind":"result"' in ln]
    kept = [ln for i, ln in enumerate(lines) if i < results[5] and '"kind":"end"' not in ln]
    kept += [ln for ln in lines[results[5]:] if '"kind":"ask"' in ln][:2]
    (run / "journal.jsonl").write_text("".join(kept) + '{"kind":"result","id":9,"ha')
    av = load_archive(run)
    assert len(av.candidates) == 5 and len(av.run.in_flight()) >= 2 and av.run.ended is None
    out = run_command(["pareto", str(run)], capsys)
    assert "not finished (running or interrupted)" in out and "in flight" in out
    pytest.importorskip("matplotlib")
    run_command(["pareto", str(run), "--plot", str(tmp_path / "live.png")], capsys)
    assert (tmp_path / "live.png").stat().st_size > 10_000


@pytest.mark.parametrize("run", [M2N2, NSGA2])
@pytest.mark.parametrize("heldout", [False, True])
def test_plot_is_written(run, heldout, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "front.png"
    text = run_command(["pareto", str(run), "--plot", str(out)] + (["--heldout"] if heldout else []), capsys)
    assert f"wrote {out}" in text
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert ("held-out scores" in text) == heldout
