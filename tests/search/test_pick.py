"""`evomerge pick` on the recorded runs: weights, minimums (binding or not, feasible or not), clear errors."""

import argparse
from pathlib import Path

import pytest

from evomerge.errors import EvomergeError
from evomerge.search.archive_view import load_archive
from evomerge.search.pick import add_pick_parser, parse_assignments, pick, pick_text

DATA = Path(__file__).parent / "data"
M2N2, NSGA2 = DATA / "m2n2_run", DATA / "nsga2_run"


def brute_pick(av, weights, minimums, pool):
    """The best weighted held-out mean among pool members meeting every minimum (earliest on ties)."""
    ok = [e for e in pool if all(e.heldout[k] >= m for k, m in minimums.items())]
    best = max(sum(w * v for w, v in zip(weights, e.heldout, strict=True)) for e in ok)
    return min((e for e in ok if sum(w * v for w, v in zip(weights, e.heldout, strict=True)) >= best - 1e-12),
               key=lambda e: (-sum(e.heldout), e.order))


def command(argv, capsys):
    parser = argparse.ArgumentParser(prog="evomerge")
    add_pick_parser(parser.add_subparsers())
    args = parser.parse_args(["pick", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("weights", [{0: 2.0, 1: 1.0}, {0: 1.0}, {1: 1.0}, {0: 1.0, 1: 3.0}])
def test_weights_choose_the_best_weighted_heldout_mean(weights):
    av = load_archive(M2N2)
    w = [weights.get(k, 0.0) for k in range(2)]
    p = pick(av, weights)
    assert p.choice is brute_pick(av, w, {}, av.front(heldout=True))
    assert p.weights == w and p.value == pytest.approx(av.mean(p.choice, True, w))
    every = pick(av, weights, all_candidates=True)  # the front always holds the weighted best
    assert every.choice.recipe_hash == p.choice.recipe_hash and len(every.pool) == len(av.candidates)
    assert p.best_source.name == ("reverse alone" if w[1] > w[0] else "add alone")


def test_default_weights_are_the_configs_and_the_text_compares_with_the_best_source(capsys):
    av = load_archive(M2N2)
    p = pick(av)
    assert p.weights == [1.0, 1.0]
    text = command([str(M2N2)], capsys)
    assert f"pick      candidate {p.candidate_id} " in text
    assert "best source alone: add alone" in text and "choice - best source" in text
    assert "runner-up candidate" in text
    assert f"evomerge export {M2N2} --candidate {p.candidate_id}" in text
    assert "no merge that beats it" in text  # on this tiny zoo the add expert alone is better
    assert command([str(M2N2), "--id-only"], capsys).strip() == str(p.candidate_id)


def test_a_binding_minimum_changes_the_choice_and_says_so(capsys):
    av = load_archive(M2N2)
    free = pick(av, {0: 2.0, 1: 1.0})
    limit = free.choice.heldout[1] + 0.01  # the unconstrained choice just misses it
    p = pick(av, {0: 2.0, 1: 1.0}, {1: limit})
    assert p.choice is brute_pick(av, [2, 1], {1: limit}, av.front(heldout=True))
    assert p.choice.recipe_hash != free.choice.recipe_hash and p.choice.heldout[1] >= limit
    assert p.binding[1].recipe_hash == free.choice.recipe_hash
    text = command([str(M2N2), "--weights", "add=2,reverse=1", "--min", f"reverse={limit}"], capsys)
    assert f"zoo_reverse >= {limit:g} binds" in text and f"candidate {free.choice.id} would win" in text
    assert f"pick      candidate {p.candidate_id} " in text


def test_a_slack_minimum_does_not_bind(capsys):
    av = load_archive(NSGA2)
    free = pick(av, {2: 1.0}, all_candidates=True)
    p = pick(av, {2: 1.0}, {2: free.choice.heldout[2] - 0.1}, all_candidates=True)
    assert p.choice is free.choice and not p.binding
    text = command([str(NSGA2), "--weights", "lexicon=1", "--min", "lexicon=0.2", "--all"], capsys)
    assert "does not change the choice" in text and "zoo_reverse=0" in text


def test_infeasible_minimums_report_the_best_achievable():
    av = load_archive(M2N2)
    best_add = max(e.heldout[0] for e in av.front(heldout=True))
    with pytest.raises(EvomergeError, match=rf"zoo_add >= 0.99: best {best_add:.3f} \(candidate \d+\), "
                                            rf"{0.99 - best_add:.3f} short"):
        pick(av, None, {0: 0.99})
    # each minimum alone is achievable, both together are not
    front = av.front(heldout=True)
    a, r = max(e.heldout[0] for e in front), max(e.heldout[1] for e in front)
    assert not any(e.heldout[0] >= a and e.heldout[1] >= r for e in front)
    with pytest.raises(EvomergeError, match="none meets them all together; the closest"):
        pick(av, None, {0: a, 1: r})


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--min", "lexicon=0.5", r"unknown task 'lexicon'; the run's tasks are: zoo_add \(or add\), zoo_reverse"),
    ("--min", "add:0.5", r"'add:0.5' is not TASK=NUMBER"),
    ("--weights", "add=two", r"'add=two' is not TASK=NUMBER"),
    ("--weights", "add=1,zoo_add=2", r"task 'zoo_add' is given twice"),
    ("--weights", "add=0", r"at least one weight must be > 0"),
    ("--weights", "add=-1,reverse=2", r"weights must be >= 0"),
])
def test_clear_errors(flag, value, message):
    av = load_archive(M2N2)
    with pytest.raises(EvomergeError, match=message):
        given = parse_assignments(av, [value], flag)
        pick(av, given if flag == "--weights" else None, given if flag == "--min" else None)


def test_search_scores_on_request_and_a_run_without_heldout(tmp_path):
    import shutil

    av = load_archive(M2N2)
    on_search = pick(av, heldout=False)
    assert on_search.choice is brute_pick_search(av)
    assert "weighted mean of search scores" in pick_text(av, on_search)
    run = tmp_path / "run"
    shutil.copytree(M2N2, run)
    journal = run / "journal.jsonl"
    journal.write_text(journal.read_text().replace('"heldout":{"task"', '"other":{"task"'))
    with pytest.raises(EvomergeError, match="no candidate has held-out scores.*--on search"):
        pick(load_archive(run))


def brute_pick_search(av):
    best = max(sum(e.search) for e in av.candidates)
    return min((e for e in av.candidates if sum(e.search) >= best - 1e-12), key=lambda e: e.order)
