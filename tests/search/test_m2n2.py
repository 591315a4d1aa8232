"""M2N2 by hand: resource competition, attraction, survival, crossover, mate selection, model space."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import RecipeError
from evomerge.search.optimizers.m2n2 import M2N2, attraction, crossover, drop_index, resource_fitness
from evomerge.search.rng import stream
from evomerge.search.types import Candidate, Evaluation, candidate_ref
from tests.search.test_optimizers import EXPERTS, FACTORIES, evaluate, identity, make_child

S = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=float)


def test_resource_competition_by_hand():
    f, z = resource_fitness(S)
    assert z.tolist() == [2, 1, 2]
    assert f.tolist() == [0.5 + 0.5, 0.5 + 1.0, 0.5]
    f2, _ = resource_fitness(S, alpha=2.0)
    assert f2.tolist() == [0.25 + 0.25, 0.25 + 1.0, 0.25]
    f0, z0 = resource_fitness(np.zeros((2, 3)))  # unsolved items: z = 1, nobody gains
    assert z0.tolist() == [1, 1, 1] and f0.tolist() == [0, 0]


def test_attraction_by_hand():
    _, z = resource_fitness(S)
    # A = member 2 solves only item 2: member 0 adds item 0 (1/2), member 1 items 0 and 1 (1/2 + 1)
    assert attraction(S, z, 2).tolist() == [0.5, 1.5, 0.0]
    assert attraction(S, z, 0).tolist() == [0.0, 1.0, 0.0]


def test_crossover_formula():
    a, b = np.zeros(4), np.ones(4)
    assert crossover(a, b, 2, 0.25).tolist() == [0.75, 0.75, 0.25, 0.25]
    assert crossover(a, b, 0, 0.25).tolist() == [0.25] * 4
    assert drop_index(np.array([0.5, 0.5, 1.0, 1.0])) == 0  # oldest of the tied members
    assert drop_index(np.array([0.5, 1.0, 0.5])) == 2  # the child ties: the child goes


def genome_m2n2(**settings) -> M2N2:
    return M2N2({"archive_size": 3, **settings}, seed=0, dim=2)


def tell_items(opt: M2N2, c: Candidate, items) -> None:
    s = float(np.mean(items))
    opt.tell(Evaluation(c.id, f"h{c.id}", (s,), s, tuple(float(v) for v in items)))


def test_empty_slots_fill_first_then_argmin_drops():
    opt = genome_m2n2()
    fresh = [opt.ask() for _ in range(3)]
    assert all(c.info == {"fresh": True} for c in fresh)
    for c, items in zip(fresh, [[1, 0, 0], [0, 1, 0], [0, 0, 0]], strict=True):
        tell_items(opt, c, items)
    assert [m["id"] for m in opt.archive()] == [0, 1, 2]  # the all-zero member took an empty slot
    child = opt.ask()
    assert child.info.keys() == {"split", "mix"}
    tell_items(opt, child, [1, 1, 0])  # pool f: 0.5, 0.5, 0, 1: member 2 is the argmin
    assert [m["id"] for m in opt.archive()] == [0, 1, 3]
    child = opt.ask()
    tell_items(opt, child, [0, 0, 1])  # z = [2, 2, 1]: f = 0.5, 0.5, 1, 1: the oldest tied member goes
    assert [m["id"] for m in opt.archive()] == [4, 1, 3]
    child = opt.ask()
    tell_items(opt, child, [0, 1, 0])  # a copy of member 1 ties with it at the minimum: the child goes
    assert [m["id"] for m in opt.archive()] == [4, 1, 3]
    assert [m["fitness"] for m in opt.archive()] == [1.0, 0.5, 1.5]  # z = [1, 2, 1]


def test_genome_child_is_the_crossover_of_its_parents():
    opt = genome_m2n2(mutation_sigma=0.0)
    for c, items in zip([opt.ask() for _ in range(3)], [[1, 0, 0], [0, 1, 0], [0, 0, 1]], strict=True):
        tell_items(opt, c, items)
    genomes = {m["hash"]: np.asarray(m["genome"]) for m in opt.archive()}
    for _ in range(5):
        c = opt.ask()
        a, b = c.parents
        assert a != b
        expected = crossover(genomes[a], genomes[b], c.info["split"], c.info["mix"])
        assert c.info["split"] == 1  # dim 2: the only split with both sides non-empty
        assert np.allclose(c.genome, expected)


def test_mate_selection_frequencies():
    opt = genome_m2n2()
    for c, items in zip([opt.ask() for _ in range(3)], S, strict=True):
        tell_items(opt, c, items)
    draws = [opt.mates(stream(5, "mates", i)) for i in range(3000)]
    a_freq = np.bincount([a for a, _ in draws], minlength=3) / len(draws)
    assert np.allclose(a_freq, np.array([1.0, 1.5, 0.5]) / 3.0, atol=0.03)
    after_2 = [b for a, b in draws if a == 2]  # g(2, .) = [0.5, 1.5, 0]
    assert abs(np.mean(np.array(after_2) == 1) - 0.75) < 0.05
    after_0 = [b for a, b in draws if a == 0]  # g(0, .) = [-, 1, 0]: B is always member 1
    assert after_0 and set(after_0) == {1}
    assert all(a != b for a, b in draws)


def test_model_space_initial_recipes_then_children():
    calls = []

    def child_of(a, b, split, mix):
        calls.append((a, b, split, mix))
        return make_child(a, b, split, mix)

    initial = [(m, identity(m)) for m in EXPERTS[:3]]
    opt = M2N2({"archive_size": 3}, seed=0, initial=initial, make_child=child_of, num_layers=6)
    first = [opt.ask() for _ in range(3)]
    assert [c.recipe for c in first] == [r for _, r in initial]
    assert opt.ask() is None  # nothing told yet: no parents to mate
    hashes = {r.content_hash(): m for m, r in initial}
    for c, items in zip(first, [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], strict=True):
        tell_items_hash(opt, c, items)
    child = opt.ask()
    assert child.genome is None and set(child.parents) <= set(hashes)
    model_a, model_b, split, mix = calls[-1]
    assert (model_a, model_b) == (hashes[child.parents[0]], hashes[child.parents[1]])
    assert child.info == {"split": split, "mix": mix} and 1 <= split < 6 and 0 <= mix <= 1
    assert child.recipe == make_child(model_a, model_b, split, mix)
    tell_items_hash(opt, child, [1, 1, 1, 1])  # dominant: it stays, named by its candidate ref
    ref = candidate_ref(child.recipe.content_hash())
    assert ref in [m["model"] for m in opt.archive()]
    for _ in range(20):
        opt.ask()
    assert any(ref in call[:2] for call in calls)


def tell_items_hash(opt: M2N2, c: Candidate, items) -> None:
    s = float(np.mean(items))
    opt.tell(Evaluation(c.id, c.recipe.content_hash(), (s,), s, tuple(float(v) for v in items)))


def test_mate_selection_fallbacks_are_uniform():
    for scores in (np.ones((3, 2)), np.zeros((3, 2))):  # all g zero; all f and g zero
        opt = genome_m2n2()
        for c, items in zip([opt.ask() for _ in range(3)], scores, strict=True):
            tell_items(opt, c, items)
        draws = [opt.mates(stream(1, "mates", i)) for i in range(600)]
        assert all(a != b for a, b in draws)
        assert set(draws) == {(a, b) for a in range(3) for b in range(3) if a != b}


def test_m2n2_fresh_genomes_from_x0():
    opt = M2N2({"archive_size": 4, "init": "x0", "init_sigma": 0.05}, seed=0, dim=3, x0=[0.2, 0.5, 0.8])
    fresh = [opt.ask().genome for _ in range(4)]
    assert fresh[0] == (0.2, 0.5, 0.8)
    assert np.abs(np.array(fresh[1:]) - [0.2, 0.5, 0.8]).max() < 0.25
    with pytest.raises(RecipeError, match="init"):
        M2N2({"init": "x0"}, seed=0, dim=3)


def test_bad_results_are_refused_without_changing_state():
    opt = genome_m2n2()
    c = opt.ask()
    before = opt.state()
    for items in ((), (0.5, 2.0)):
        with pytest.raises(ValueError, match="item scores"):
            opt.tell(Evaluation(c.id, "h", (0.5,), 0.5, items))
    assert opt.state() == before
    tell_items(opt, c, [1, 0])
    nsga = FACTORIES["nsga2"](0)
    a, b = nsga.ask(), nsga.ask()
    nsga.tell(evaluate(a))
    with pytest.raises(ValueError, match="objectives"):
        nsga.tell(Evaluation(b.id, "h", (1.0, 2.0, 3.0), 1.0, ()))
    nsga.tell(evaluate(b))
