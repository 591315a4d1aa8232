"""The in-process evaluator: in-place materialization equals a plain merge, bit for bit, and a source
checkpoint changed on disk between candidates is read afresh, never served from what was cached."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from evomerge.merge import merge_tensor
from evomerge.plan import build_plan
from evomerge.recipe.schema import Recipe, Source
from evomerge.search.evaluator import InProcessEvaluator, ScoredTask

pytestmark = pytest.mark.slow


@pytest.fixture
def models(quick_zoo, tmp_path):
    """Copies of the quick zoo's base and experts, free to be changed by the test."""
    out = {"base": shutil.copytree(quick_zoo.base, tmp_path / "base")}
    for skill, path in quick_zoo.experts.items():
        out[skill] = shutil.copytree(path, tmp_path / skill)
    return out


@pytest.fixture
def tasks(quick_zoo):
    from evomerge.fitness.task import load_task

    return [ScoredTask(load_task(quick_zoo.tasks["add"]), 1.0, "search", None)]


def recipe(models, w_add, w_rev, seed=0):
    return Recipe(method="task_arithmetic", base=str(models["base"]), seed=seed,
                  sources=[Source(model=str(models["add"]), parameters={"weight": w_add}),
                           Source(model=str(models["reverse"]), parameters={"weight": w_rev})])


def plain_merge(r: Recipe) -> dict[str, torch.Tensor]:
    """The merged tensors, read the plain way (checkpoints opened for this plan alone, pread)."""
    plan = build_plan(r, models_root(r), seed=r.seed)
    try:
        return {job.out.name: merge_tensor(plan, job) for job in plan.jobs}
    finally:
        plan.close()


def models_root(r: Recipe):
    return os.path.dirname(r.base)


def resident_weights(ev: InProcessEvaluator) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in ev.resident().model.state_dict().items()}


def assert_resident_is(ev, expected):
    got = resident_weights(ev)
    assert set(expected) <= set(got)
    for name, value in expected.items():
        assert torch.equal(got[name], value.to(got[name].dtype)), name


def test_in_place_materialization_equals_a_plain_merge(models, tasks, tmp_path):
    ev = InProcessEvaluator(tasks, models["base"], scratch=tmp_path / "scratch")
    try:
        for w_add, w_rev in ((0.7, 0.4), (1.2, -0.3), (0.0, 1.0)):
            r = recipe(models, w_add, w_rev)
            outcome = ev.evaluate(r)
            assert outcome.timings["in_place"] == 1.0
            assert_resident_is(ev, plain_merge(r))
    finally:
        ev.close()


def rewrite_in_place(path, tensors):
    """New bytes into the same file (same inode), as a save that truncates and writes would leave it."""
    inode = path.stat().st_ino
    with open(path, "r+b") as f:
        f.write(save(tensors))
        f.truncate()
    assert path.stat().st_ino == inode
    # File times can be coarser than two writes in a row: move the clock on as a later write would.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def replace_by_rename(path, tensors):
    tmp = path.with_name("incoming.safetensors")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


@pytest.mark.parametrize("change", [rewrite_in_place, replace_by_rename], ids=["in place", "by rename"])
def test_a_source_changed_on_disk_is_read_afresh(models, tasks, tmp_path, change):
    r = recipe(models, 0.8, 0.5)
    ev = InProcessEvaluator(tasks, models["base"], scratch=tmp_path / "scratch")
    try:
        first = ev.evaluate(r)
        before = resident_weights(ev)
        # the 'add' expert becomes another model: the lexicon expert's weights, under the same names
        weights = models["add"] / "model.safetensors"
        change(weights, load_file(models["lexicon"] / "model.safetensors"))
        expected = plain_merge(r)
        assert any(not torch.equal(before[n], t) for n, t in expected.items())  # the change matters
        second = ev.evaluate(r)
        assert_resident_is(ev, expected)
    finally:
        ev.close()
    fresh = InProcessEvaluator(tasks, models["base"], scratch=tmp_path / "scratch2")
    try:
        assert fresh.evaluate(r).results["zoo_add"]["search"].scores == second.results["zoo_add"]["search"].scores
    finally:
        fresh.close()
    assert first.results["zoo_add"]["search"].item_ids == second.results["zoo_add"]["search"].item_ids


def test_sources_are_checked_for_nan_once_per_version_of_their_files(models, tasks, tmp_path, monkeypatch):
    import evomerge.merge as m
    from evomerge.errors import NonFiniteError

    checked = []
    real = m._finite

    def counting(t, what):
        checked.append(what)
        real(t, what)

    monkeypatch.setattr(m, "_finite", counting)
    r = recipe(models, 0.8, 0.5)
    ev = InProcessEvaluator(tasks, models["base"], scratch=tmp_path / "scratch")
    try:
        ev.evaluate(r)
        inputs = [w for w in checked if " of model " in w]
        assert len(inputs) == len(set(inputs)) > 0  # each source tensor once
        checked.clear()
        ev.evaluate(recipe(models, 0.3, 0.9))
        assert checked and not [w for w in checked if " of model " in w]  # files unchanged: outputs only
        # A NaN in a file replaced since: the new version is checked, and the bad input named.
        weights = models["add"] / "model.safetensors"
        sd = load_file(weights)
        name = next(n for n in sd if "mlp" in n)
        sd[name].view(-1)[0] = float("nan")
        replace_by_rename(weights, sd)
        with pytest.raises(NonFiniteError, match=f"tensor '{name}' of model"):
            ev.evaluate(r)
    finally:
        ev.close()
