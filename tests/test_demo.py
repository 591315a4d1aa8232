"""The README's main command, at a small budget: zoo -> two searches on local Ray -> plots -> export."""

import shutil

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_demo_pipeline(quick_zoo, tmp_path, capsys):
    from evomerge.demo import run_demo
    from evomerge.search.store import read_run

    shutil.copytree(quick_zoo.root, tmp_path / "zoo")  # the session's quick zoo: the demo finds it cached
    model = run_demo(tmp_path, budget=6, quick=True, workers=2)
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "best found:" in out and "add alone" in out
    assert "TIES (weight 1, density 0.5)" in out
    assert (model / "config.json").exists() and (model / "README.md").exists()
    for run in ("cmaes-ties", "m2n2-models"):
        view = read_run(tmp_path / "runs" / run)
        assert view.evaluated >= 6 and view.ended["reason"] == "budget"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "pareto-cmaes-ties.png").stat().st_size > 10_000
    # a second call finishes instantly from the cache and the journals
    run_demo(tmp_path, budget=6, quick=True, workers=2)
    assert read_run(tmp_path / "runs" / "cmaes-ties").evaluated == 6
