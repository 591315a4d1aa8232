"""Optimizers: a contract suite run over every optimizer, each beating random search on a synthetic
problem, and CMA-ES specifics (hand-computed M2N2 cases: test_m2n2.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from evomerge.errors import RecipeError
from evomerge.recipe.schema import Recipe, Source
from evomerge.search.optimizers import OPTIMIZERS, make_optimizer
from evomerge.search.optimizers.cmaes import penalised
from evomerge.search.pareto import ParetoArchive
from evomerge.search.rng import stream
from evomerge.search.types import Candidate, Evaluation, Optimizer

DIM = 5
NUM_ITEMS = 12


def identity(model: str) -> Recipe:
    return Recipe(method="linear", sources=[Source(model=model)])


def make_child(model_a: str, model_b: str, split: int, mix: float) -> Recipe:
    """A stand-in for lineage.crossover_recipe: any Recipe that records its arguments."""
    return Recipe(
        method="linear",
        sources=[Source(model=model_a, parameters={"weight": mix}), Source(model=model_b)],
        parameters={"split": float(split)},
    )


EXPERTS = [f"experts/e{i}" for i in range(4)]

FACTORIES = {
    "random": lambda seed: make_optimizer("random", {}, dim=DIM, seed=seed, x0=[0.5] * DIM),
    "cmaes": lambda seed: make_optimizer("cmaes", {"popsize": 6}, dim=DIM, seed=seed),
    "m2n2": lambda seed: make_optimizer("m2n2", {"archive_size": 6}, dim=DIM, seed=seed),
    "m2n2-model": lambda seed: make_optimizer(
        "m2n2",
        {"archive_size": 5},
        seed=seed,
        initial=[(m, identity(m)) for m in EXPERTS],
        make_child=make_child,
        num_layers=4,
    ),
    "nsga2": lambda seed: make_optimizer("nsga2", {"popsize": 6}, dim=DIM, seed=seed),
}
GENOME_OPTIMIZERS = ["random", "cmaes", "m2n2", "nsga2"]


def recipe_hash(c: Candidate) -> str:
    return c.recipe.content_hash() if c.recipe is not None else "g" + json.dumps(c.genome)


def evaluate(c: Candidate, fail: bool = False) -> Evaluation:
    """A deterministic fake fitness: 0/1 items from the genome (or a hash-seeded draw for recipes)."""
    h = recipe_hash(c)
    if fail:
        return Evaluation(c.id, h, (0.0, 0.0), float("-inf"), (0.0,) * NUM_ITEMS, failed=True)
    if c.genome is not None:
        x = np.asarray(c.genome)
        items = (np.abs(x[np.arange(NUM_ITEMS) % DIM] - np.linspace(0.1, 0.9, NUM_ITEMS)) < 0.3) * 1.0
    else:
        items = (stream(0, "fake", h).random(NUM_ITEMS) < 0.4) * 1.0
    half = NUM_ITEMS // 2
    return Evaluation(c.id, h, (items[:half].mean(), items[half:].mean()), float(items.mean()), tuple(items))


def record(c: Candidate) -> tuple:
    return (c.id, c.genome, recipe_hash(c), c.parents, json.dumps(c.info, sort_keys=True))


def drive(opt: Optimizer, steps: int, *, workers: int = 3, fails=(), snapshot_at=None, rebuild=None):
    """Keep up to ``workers`` candidates in flight; each step tells a random subset in shuffled order.
    At step ``snapshot_at`` the optimizer's state goes through JSON into ``rebuild()``."""
    asked, inflight = [], []
    snapshot = None
    for step in range(steps):
        if step == snapshot_at:
            snapshot = json.loads(json.dumps(opt.state(), allow_nan=False))
            opt = rebuild()
            opt.load_state(snapshot)
        while len(inflight) < workers and (c := opt.ask()) is not None:
            asked.append(record(c))
            inflight.append(c)
        assert inflight, "the optimizer waits with nothing in flight"
        rng = random.Random(step)
        rng.shuffle(inflight)
        k = rng.randint(1, len(inflight))
        for c in inflight[:k]:
            opt.tell(evaluate(c, fail=c.id in fails))
        inflight = inflight[k:]
    return asked, opt, snapshot


# -- contract suite ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_same_seed_same_candidates(name):
    a, opt, _ = drive(FACTORIES[name](3), 40)
    b, _, _ = drive(FACTORIES[name](3), 40)
    c, _, _ = drive(FACTORIES[name](4), 40)
    assert a == b
    assert a != c
    assert opt.name == name.split("-")[0]
    assert isinstance(opt, Optimizer)


@pytest.mark.parametrize("snapshot_at", [4, 8, 13])
@pytest.mark.parametrize("name", FACTORIES)
def test_restored_state_continues_exactly(name, snapshot_at):
    factory = FACTORIES[name]
    whole, opt, _ = drive(factory(1), 40)
    resumed, opt2, snap = drive(factory(1), 40, snapshot_at=snapshot_at, rebuild=lambda: factory(1))
    assert resumed == whole
    assert opt2.best() == opt.best()
    state, state2 = opt.state(), opt2.state()
    if name == "cmaes":  # the pickled strategy holds wall-clock timers: compare what drives it
        es, es2 = opt._es, opt2._es
        assert np.array_equal(es.mean, es2.mean) and es.sigma == es2.sigma and np.array_equal(es.C, es2.C)
        del state["es"], state2["es"]
    assert json.dumps(state2, allow_nan=False) == json.dumps(state, allow_nan=False)
    if name in ("cmaes", "nsga2"):  # 3 workers, popsize 6: snapshots inside and between generations
        batch = snap["solutions" if name == "cmaes" else "offspring"]
        where = {4: (True, 6), 8: (False, 0), 13: (True, 5)}[snapshot_at]  # (mid-generation, asked)
        assert (batch is not None, snap["asked"]) == where
        assert bool(snap["slots"]) == (snapshot_at == 4)  # at 4 one candidate of the generation is in flight


@pytest.mark.parametrize("name", ["cmaes", "nsga2"])
def test_generation_tell_order_does_not_matter(name):
    def run(order_seed):
        opt = FACTORIES[name](0)
        asked = []
        for _ in range(4):
            gen = []
            while (c := opt.ask()) is not None:
                gen.append(c)
            asked += [c.genome for c in gen]
            random.Random(order_seed).shuffle(gen)
            for c in gen:
                opt.tell(evaluate(c))
        return asked, opt.best()

    assert run(0) == run(1)


@pytest.mark.parametrize("name", FACTORIES)
def test_failures_do_not_break_it(name):
    fails = {i for i in range(200) if i % 4 == 1}
    asked, opt, _ = drive(FACTORIES[name](2), 60, fails=fails)
    assert len(asked) > 30
    best = opt.best()
    assert best is not None and not best.failed and best.candidate_id not in fails
    json.dumps(opt.state(), allow_nan=False)


@pytest.mark.parametrize("name", GENOME_OPTIMIZERS)
def test_everything_failing_keeps_asking(name):
    asked, opt, _ = drive(FACTORIES[name](0), 40, fails=set(range(10_000)))
    assert len(asked) >= 40
    assert opt.best() is None
    assert all(0.0 <= v <= 1.0 for r in asked for v in r[1])


@pytest.mark.parametrize("name", FACTORIES)
def test_unknown_or_repeated_tell_is_an_error(name):
    opt = FACTORIES[name](0)
    c = opt.ask()
    with pytest.raises(ValueError, match="not asked"):
        opt.tell(evaluate(Candidate(id=99, genome=(0.5,) * DIM)))
    opt.tell(evaluate(c))
    with pytest.raises(ValueError, match="already told"):
        opt.tell(evaluate(c))


@pytest.mark.parametrize("name", GENOME_OPTIMIZERS)
def test_state_from_another_configuration_is_refused(name):
    state = FACTORIES[name](0).state()
    other = make_optimizer(name, {}, dim=DIM + 1, seed=0)
    with pytest.raises(ValueError, match="'dim'"):
        other.load_state(state)


@pytest.mark.parametrize(
    ("name", "settings", "key"),
    [
        ("random", {"bogus": 1}, "bogus"),
        ("random", {"start_at_x0": "perhaps"}, "start_at_x0"),
        ("cmaes", {"sigma0": -0.1}, "sigma0"),
        ("cmaes", {"popsize": 1}, "popsize"),
        ("cmaes", {"sigma": 0.2}, "sigma"),
        ("m2n2", {"archive_size": 1}, "archive_size"),
        ("m2n2", {"mode": "both"}, "mode"),
        ("nsga2", {"popsize": 2}, "popsize"),
        ("nsga2", {"eta_crossover": 0}, "eta_crossover"),
    ],
)
def test_settings_errors_name_the_key(name, settings, key):
    with pytest.raises(RecipeError, match=key):
        make_optimizer(name, settings, dim=DIM, seed=0)


def test_registry_and_factory_errors():
    assert set(OPTIMIZERS) == {"random", "cmaes", "m2n2", "nsga2"}
    with pytest.raises(RecipeError, match="known: random, cmaes, m2n2, nsga2"):
        make_optimizer("pso", {}, dim=DIM, seed=0)
    with pytest.raises(TypeError, match="initial"):
        make_optimizer("cmaes", {}, dim=DIM, seed=0, initial=[])
    with pytest.raises(RecipeError, match="mutation_sigma"):
        make_optimizer("m2n2", {"mutation_sigma": 0.1}, seed=0, initial=[(m, identity(m)) for m in EXPERTS],
                       make_child=make_child, num_layers=4)  # fmt: skip


# -- each optimizer beats random search ----------------------------------------------------------


def run_budget(opt: Optimizer, budget: int, fitness, workers: int = 4) -> Optimizer:
    inflight, told = [], 0
    while told < budget:
        while len(inflight) < workers and told + len(inflight) < budget and (c := opt.ask()) is not None:
            inflight.append(c)
        opt.tell(fitness(inflight.pop(0)))
        told += 1
    return opt


def sphere(c: Candidate) -> Evaluation:
    x = np.asarray(c.genome)
    s = -float(np.sum((x - np.linspace(0.2, 0.8, len(x))) ** 2))
    return Evaluation(c.id, str(c.id), (s,), s, ())


def coverage(c: Candidate) -> Evaluation:
    """Per-gene 0/1 items at shrinking tolerances: each gene's hard items are a separate niche."""
    x = np.asarray(c.genome)
    d = np.abs(x - np.linspace(0.15, 0.85, len(x)))
    items = tuple(float(d[i] < r) for i in range(len(x)) for r in (0.3, 0.15, 0.07, 0.03))
    s = float(np.mean(items))
    return Evaluation(c.id, str(c.id), (s,), s, items)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmaes_beats_random_on_a_sphere(seed):
    rs = run_budget(make_optimizer("random", {}, dim=8, seed=seed), 200, sphere).best().scalar
    cm = run_budget(make_optimizer("cmaes", {}, dim=8, seed=seed), 200, sphere).best().scalar
    assert cm > rs + 0.05  # random: about -0.2, CMA-ES: about -0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_m2n2_beats_random_on_coverage(seed):
    rs = run_budget(make_optimizer("random", {}, dim=8, seed=seed), 300, coverage).best().scalar
    m2 = run_budget(make_optimizer("m2n2", {}, dim=8, seed=seed), 300, coverage).best().scalar
    assert m2 > rs + 0.1  # random: about 0.55, M2N2: about 0.8


@pytest.mark.parametrize("seed", [0, 1])
def test_nsga2_beats_random_on_hypervolume(seed):
    def hv(name):
        arc = ParetoArchive()

        def zdt1(c):  # ZDT1 (minimised) turned into maximised objectives above the reference 0
            x = np.asarray(c.genome)
            g = 1 + 9 * x[1:].mean()
            obj = (1.0 - x[0], 10.0 - g * (1 - np.sqrt(x[0] / g)))
            arc.add(c.id, obj)
            return Evaluation(c.id, str(c.id), obj, float(sum(obj)), ())

        run_budget(make_optimizer(name, {}, dim=6, seed=seed), 400, zdt1)
        return arc.hypervolume()

    assert hv("nsga2") > hv("random") + 0.5  # random: about 8.2, NSGA-II: about 9.4


def test_cmaes_failure_penalty():
    assert penalised([1.0, None, 3.0]) == [1.0, 1.0 - 3.0, 3.0]
    assert penalised([None, None]) == [0.0, 0.0]
    assert penalised([float("nan"), 2.0]) == [1.0, 2.0]


def test_cmaes_defaults_and_global_rng_untouched():
    opt = make_optimizer("cmaes", {}, dim=8, seed=0)
    assert opt.popsize == 4 + int(3 * np.log(8))
    before = np.random.get_state()[1].copy()
    gen = [opt.ask() for _ in range(opt.popsize)]
    assert opt.ask() is None
    for c in gen:
        opt.tell(sphere(c))
    assert np.array_equal(np.random.get_state()[1], before)
    spread = np.array([c.genome for c in gen])
    assert abs(spread.mean() - 0.5) < 0.1 and 0.08 < spread.std() < 0.25  # x0 = 0.5, sigma0 = 1/6


def test_cmaes_restarts_when_pycma_stops():
    opt = make_optimizer("cmaes", {"popsize": 4}, dim=2, seed=0)
    for _ in range(6):
        gen = [opt.ask() for _ in range(4)]
        for c in gen:
            opt.tell(evaluate(c, fail=True))  # flat fitness: pycma stops, a fresh strategy starts
    assert opt.state()["restarts"] >= 1
    assert opt.ask().info["restart"] >= 1


def test_make_optimizer_takes_dim_and_x0_from_the_space():
    class Space:
        dim = 3

        def x0(self):
            return np.array([0.1, 0.2, 0.3])

    assert make_optimizer("random", {}, space=Space(), seed=0).ask().genome == (0.1, 0.2, 0.3)
    nsga = make_optimizer("nsga2", {"popsize": 4}, space=Space(), seed=0, n_objectives=3)
    assert nsga.ask().genome == (0.1, 0.2, 0.3)
    c = nsga.ask()
    with pytest.raises(ValueError, match="2 objectives, expected 3"):
        nsga.tell(Evaluation(c.id, "h", (1.0, 2.0), 1.0, ()))
    cm = make_optimizer("cmaes", {}, space=Space(), seed=0, n_objectives=2)
    assert cm.x0.tolist() == [0.1, 0.2, 0.3]


_CROSS_PROCESS = """
import json, sys
from evomerge.search.optimizers import make_optimizer
from evomerge.search.types import Evaluation
state, told = json.loads(sys.stdin.read())
opt = make_optimizer("cmaes", {"popsize": 4}, dim=3, seed=5, x0=[0.95, 0.9, 0.05])
opt.load_state(state)
out = []
for cid, value in told:
    opt.tell(Evaluation(cid, str(cid), (value,), value, (value,)))
for _ in range(8):
    c = opt.ask()
    out.append(list(c.genome))
    opt.tell(Evaluation(c.id, str(c.id), (sum(c.genome),), sum(c.genome), (0.0,)))
print(json.dumps(out))
"""


@pytest.mark.parametrize("stop_after", [2, 4, 6])
def test_cmaes_state_restores_in_another_process(stop_after):
    """pycma keys solutions by hash(), which changes between processes: restore in a fresh interpreter
    with another hash seed, mid-generation and at a boundary, and continue exactly."""
    import json
    import os
    import subprocess
    import sys

    from evomerge.search.optimizers import make_optimizer

    def f(c):
        return sum(c.genome)

    opt = make_optimizer("cmaes", {"popsize": 4}, dim=3, seed=5, x0=[0.95, 0.9, 0.05])
    for i in range(stop_after):  # ask and tell, all but the last candidate
        last = opt.ask()
        if i < stop_after - 1:
            opt.tell(Evaluation(last.id, str(last.id), (f(last),), f(last), (f(last),)))
    state = opt.state()
    # uninterrupted
    opt.tell(Evaluation(last.id, str(last.id), (f(last),), f(last), (f(last),)))
    expected = []
    for _ in range(8):
        c = opt.ask()
        expected.append(list(c.genome))
        opt.tell(Evaluation(c.id, str(c.id), (sum(c.genome),), sum(c.genome), (0.0,)))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", _CROSS_PROCESS], input=json.dumps([state, [(last.id, f(last))]]),
                         capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out) == expected
