"""Re-make the recorded runs in this folder: real searches on the quick tiny zoo, baselines on.

    OMP_NUM_THREADS=1 .venv/bin/python tests/search/data/make_recorded_run.py [WORK_DIR]

``m2n2_run/``: two tasks (add, reverse), TIES with one layer group, M2N2 in genome mode (archive of 6:
six fresh genomes, then crossover children with two parents each), 14 evaluations.
``nsga2_run/``: three tasks (add, reverse, lexicon), task arithmetic, NSGA-II with 4 per generation,
8 evaluations (cache hits are free, so more candidates are asked).

Only config.yaml and journal.jsonl are kept; the zoo's folder in both is replaced by ``/moved/quick-zoo``
so that a fixture reads like a run whose models moved (read it with ``check_paths=False``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MOVED = "/moved/quick-zoo"
RUNS = {
    "m2n2_run": (("add", "reverse"), "ties", {"name": "m2n2", "settings": {"archive_size": 6}}, 14),
    "nsga2_run": (("add", "reverse", "lexicon"), "task_arithmetic",
                  {"name": "nsga2", "settings": {"popsize": 4}}, 8),
}


def main(work: Path) -> None:
    from evomerge.zoo.build import build_zoo

    zoo = build_zoo(work / "zoo", quick=True)
    for name, spec in RUNS.items():
        record(zoo, work, name, *spec)


def record(zoo, work: Path, name: str, skills, method: str, optimizer: dict, evaluations: int) -> None:
    from evomerge.search.config import parse_search_config
    from evomerge.search.run import start_run

    data = {
        "name": f"quick-zoo-{optimizer['name']}",
        "seed": 1,
        "models": {"base": str(zoo.base), "sources": [str(zoo.experts[s]) for s in skills]},
        "space": {"kind": "parameters", "method": method, "layer_groups": 1},
        "tasks": [{"path": str(zoo.tasks[s])} for s in skills],
        "optimizer": optimizer,
        "budget": {"evaluations": evaluations},
        "evaluation": {"batch_size": 64},
        "workers": {"ray": False},
    }
    run_dir, out = work / name, HERE / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start_run(parse_search_config(data, work), run_dir, progress=False)
    out.mkdir(exist_ok=True)
    root = str(zoo.root.resolve())
    for file in ("config.yaml", "journal.jsonl"):
        (out / file).write_text((run_dir / file).read_text().replace(root, MOVED))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="recorded-run-")))
