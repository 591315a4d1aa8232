"""``evomerge validate RUN_DIR [--split NAME] [--top K] [--drop 0.1]``: re-score candidates and flag overfitting.

The search front (or the top K candidates by the search scalar) is evaluated again with a real evaluator,
on each task's held-out split (or on ``--split NAME`` for every task), and a candidate is flagged when its
weighted mean there falls more than ``--drop`` below its weighted search mean: the optimizer climbed items
that do not generalize. Lineage candidates (model space) are rebuilt from the run's own recipes, through
the run's materialization cache. Where the journal already holds scores on that split they are compared
too (``reproduced``: the same per-item scores again).

Results go to ``RUN_DIR/validation.json`` (replaced atomically; the journal is never touched, since a run
may still be writing it). The run's models must exist where its config says.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.search.archive_view import ArchiveView, Entry, load_archive, table
from evomerge.search.store import CONFIG, split_mean

log = logging.getLogger(__name__)
VALIDATION = "validation.json"


def select(av: ArchiveView, top: int | None = None) -> list[Entry]:
    """The search front (best weighted search mean first), or the ``top`` candidates by that mean."""
    pool = av.candidates if top else av.front()
    ranked = sorted(pool, key=lambda e: (-(av.mean(e) or 0.0), e.order))
    return ranked[:top] if top else ranked


def _evaluator(av: ArchiveView, split: str | None, device: str | None):
    """An in-process evaluator scoring one split per task (``split``, else each task's held-out split)."""
    from evomerge.recipe.load import parse_recipe
    from evomerge.search.config import load_search_config
    from evomerge.search.evaluator import ScoredTask
    from evomerge.search.setup import evaluator_for

    config = load_search_config(av.run_dir / CONFIG)  # checks that the models are still there
    if device:
        config = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"device": device})})
    recipes = {}
    for c in sorted(av.run.candidates.values(), key=lambda c: c.id):
        if c.recipe_hash not in recipes:
            recipes[c.recipe_hash] = parse_recipe(c.recipe, f"candidate {c.id}")
    evaluator = evaluator_for(config, av.run_dir, recipes)
    tasks = []
    for t in evaluator.tasks:
        name = split or t.heldout_split
        if name is None:
            raise EvomergeError(f"task '{t.task.name}' has no held-out split in the run's config; "
                                "give --split NAME")
        t.task.items(name)  # an unknown split is a TaskError naming the allowed ones
        tasks.append(ScoredTask(t.task, t.weight, name, None))
    evaluator.tasks, evaluator.heldout = tasks, False
    return evaluator, recipes


def _means(results: dict[str, dict[str, Any]], tasks: list[str], splits: list[str]) -> list[float] | None:
    out = []
    for task, split in zip(tasks, splits, strict=True):
        r = results.get(task, {}).get(split)
        if r is None:
            return None
        out.append(split_mean(r if isinstance(r, dict) else r.model_dump(mode="json")))
    return out


def _weighted(av: ArchiveView, values) -> float:
    return math.fsum(w * v for w, v in zip(av.weights, values, strict=True)) / math.fsum(av.weights)


def validate(run_dir: str | Path, *, split: str | None = None, top: int | None = None, drop: float = 0.1,
             device: str | None = None) -> dict[str, Any]:
    """Re-score the selected candidates, write ``run_dir/validation.json`` and return its content."""
    av = load_archive(run_dir)
    chosen = select(av, top)
    if not chosen:
        raise EvomergeError(f"'{av.run_dir}': no candidate has been evaluated yet")
    evaluator, recipes = _evaluator(av, split, device)
    splits = [t.search_split for t in evaluator.tasks]
    rows = []
    try:
        for e in chosen:
            rows.append(_one(av, e, evaluator, recipes, splits, drop))
    finally:
        evaluator.close()
    report = {
        "run_dir": str(av.run_dir), "t": time.time(), "split": split or "heldout", "splits": dict(zip(
            av.tasks, splits, strict=True)), "selection": f"top {top}" if top else "search front", "drop": drop,
        "tasks": av.tasks, "weights": av.weights, "candidates": rows,
        "flagged": [r["id"] for r in rows if r["flagged"]],
    }
    out = av.run_dir / VALIDATION
    tmp = out.with_name(f".{VALIDATION}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, out)
    return report


def _one(av: ArchiveView, e: Entry, evaluator, recipes, splits: list[str], drop: float) -> dict[str, Any]:
    row: dict[str, Any] = {"id": e.id, "ids": list(e.ids), "recipe_hash": e.recipe_hash,
                           "search": dict(zip(av.tasks, e.search, strict=True)), "search_mean": av.mean(e)}
    started = time.perf_counter()
    try:
        outcome = evaluator.evaluate(recipes[e.recipe_hash])
    except Exception as err:  # one candidate that cannot be rebuilt must not lose the others' results
        log.warning("candidate %s could not be re-scored: %s", e.id, err)
        return {**row, "error": f"{type(err).__name__}: {err}", "flagged": True}
    values = _means(outcome.results, av.tasks, splits)
    row.update(rescored=dict(zip(av.tasks, values, strict=True)), rescored_mean=_weighted(av, values),
               seconds=time.perf_counter() - started)
    row["drop"] = row["search_mean"] - row["rescored_mean"]
    row["task_drops"] = {t: s - v for t, s, v in zip(av.tasks, e.search, values, strict=True)}
    row["flagged"] = row["drop"] > drop + 1e-12  # "more than": an exact tie (0.36 - 0.26) is not a drop
    record = next((r for r in av.run.results.values() if r.recipe_hash == e.recipe_hash), None)
    recorded = _means(record.results, av.tasks, splits) if record else None
    row["recorded"] = dict(zip(av.tasks, recorded, strict=True)) if recorded else None
    if recorded:
        same = [_scores(record.results, t, s) == _scores(outcome.results, t, s) for t, s in zip(av.tasks, splits,
                                                                                                 strict=True)]
        row["reproduced"] = all(same)
    else:
        row["reproduced"] = None
    return row


def _scores(results, task: str, split: str) -> list[float]:
    r = results[task][split]
    return list(r["scores"] if isinstance(r, dict) else r.scores)


def validation_text(report: dict[str, Any]) -> str:
    """The re-scored candidates as a table, flagged ones marked."""
    tasks = report["tasks"]
    split = report["split"]
    headers = ["id", *[f"{t} search->{split}" for t in tasks], "mean search->" + split, "drop", "flag", "journal"]
    rows = []
    for r in report["candidates"]:
        if "error" in r:
            rows.append([str(r["id"]), *["-"] * len(tasks), "-", "-", "ERROR", r["error"][:60]])
            continue
        cells = [f"{r['search'][t]:.3f}->{r['rescored'][t]:.3f}" for t in tasks]
        journal = {True: "same scores", False: "DIFFERENT", None: "-"}[r["reproduced"]]
        rows.append([str(r["id"]), *cells, f"{r['search_mean']:.3f}->{r['rescored_mean']:.3f}",
                     f"{r['drop']:+.3f}", "DROP" if r["flagged"] else "ok", journal])
    n = len(report["flagged"])
    lines = [f"validate  {report['run_dir']}: {report['selection']}, {len(rows)} candidate(s) re-scored on "
             f"{split} ({', '.join(f'{t}: {s}' for t, s in report['splits'].items())})",
             *table(headers, rows, set(range(1, len(tasks) + 3))),
             f"{n} flagged: weighted mean more than {report['drop']:g} below the search mean"
             + (f" ({', '.join(map(str, report['flagged']))})" if n else ""),
             "'journal': whether the run's own scores on that split were reproduced item for item",
             f"wrote {Path(report['run_dir']) / VALIDATION}"]
    return "\n".join(lines)


def _validate_cmd(args: argparse.Namespace) -> int:
    if args.top is not None and args.top < 1:
        raise EvomergeError("--top must be >= 1")
    report = validate(args.run_dir, split=args.split, top=args.top, drop=args.drop, device=args.device)
    print(validation_text(report))
    return 0


def add_validate_parser(sub) -> argparse.ArgumentParser:
    """Register ``evomerge validate RUN_DIR [--split NAME] [--top K] [--drop D] [--device DEV]``."""
    p = sub.add_parser("validate", help="re-score the front on held-out splits and flag drops from search scores",
                       description="Re-score the search front (or the top K by search scalar) on each task's "
                                   "held-out split (or --split) and flag candidates whose weighted mean drops "
                                   "more than --drop below their search mean. Writes RUN_DIR/validation.json.")
    p.add_argument("run_dir", help="a search run directory (its models must exist)")
    p.add_argument("--split", default=None, help="score this split of every task file instead of held-out")
    p.add_argument("--top", type=int, default=None, help="the K best by search scalar instead of the front")
    p.add_argument("--drop", type=float, default=0.1, help="flag a mean this far below search (default 0.1)")
    p.add_argument("--device", default=None, help="evaluate on this device (default: the run's)")
    p.set_defaults(func=_validate_cmd)
    return p
