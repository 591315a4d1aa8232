"""``evomerge pick RUN_DIR [--weights add=2,reverse=1] [--min reverse=0.5 ...] [--all]``: choose one merge.

Among the evaluated candidates (the Pareto front on held-out scores, or every candidate with ``--all``),
the choice is the one with the highest weighted mean of held-out task scores among those meeting every
``--min`` (a lower bound on a task's held-out score). Held-out scores are used because search scores are
what the optimizer climbed and so flatter every candidate. Restricting to the front never changes the
choice: whatever meets the minimums and scores best, a front member that dominates it does too (ties go to
the earlier evaluation); ``--all`` only widens the runner-up and the explanation.

Tasks are named by their task name (``zoo_add``) or their file's stem (``add``). With ``--weights``, tasks
not named weigh 0; without it the config's weights are used. The result says which minimums bound (the
choice would differ without them), the runner-up, and how the choice compares with the best source model
alone; ``pick`` returns the candidate id for ``evomerge export RUN_DIR --candidate ID``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from evomerge.errors import EvomergeError
from evomerge.search.archive_view import SOURCE, ArchiveView, Entry, load_archive, table


@dataclass
class Pick:
    """What ``pick`` chose, and why."""

    choice: Entry
    value: float  # its weighted mean on the chosen basis
    weights: list[float]
    minimums: dict[int, float]
    pool: list[Entry]
    feasible: list[Entry]  # pool members meeting every minimum, best first
    heldout: bool
    all_candidates: bool = False
    runner_up: Entry | None = None
    binding: dict[int, Entry] = field(default_factory=dict)  # task -> the winner without that minimum
    best_source: Entry | None = None

    @property
    def candidate_id(self) -> int:
        return self.choice.id


def parse_assignments(av: ArchiveView, items: list[str] | None, flag: str) -> dict[int, float]:
    """``["add=2,reverse=1", "lexicon=0.5"]`` -> {task index: value}; clear errors for anything else."""
    out: dict[int, float] = {}
    for item in items or []:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, eq, value = part.partition("=")
            try:
                number = float(value) if eq else math.nan
            except ValueError:
                number = math.nan
            if not eq or not name.strip() or not math.isfinite(number):
                raise EvomergeError(f"{flag}: '{part}' is not TASK=NUMBER (e.g. {flag} {av.stems[0]}=0.5)")
            k = av.task_index(name.strip())
            if k in out:
                raise EvomergeError(f"{flag}: task '{av.tasks[k]}' is given twice")
            out[k] = number
    return out


def _weights(av: ArchiveView, given: dict[int, float]) -> list[float]:
    if not given:
        return list(av.weights)
    if any(w < 0 for w in given.values()):
        raise EvomergeError("--weights: weights must be >= 0")
    weights = [given.get(k, 0.0) for k in range(len(av.tasks))]
    if sum(weights) <= 0:
        raise EvomergeError("--weights: at least one weight must be > 0")
    return weights


def pick(av: ArchiveView, weights: dict[int, float] | None = None, minimums: dict[int, float] | None = None,
         *, all_candidates: bool = False, heldout: bool = True) -> Pick:
    """Choose a candidate (see the module docstring); EvomergeError when nothing qualifies."""
    w = _weights(av, weights or {})
    minimums = dict(minimums or {})
    basis = "held-out" if heldout else "search"
    scored = [e for e in av.candidates if e.scores(heldout) is not None]
    if not scored:
        hint = (" (evaluation.heldout: none?); `--on search` picks on search scores"
                if heldout and av.candidates else "")
        raise EvomergeError(f"'{av.run_dir}': no candidate has {basis} scores yet{hint}")
    pool = scored if all_candidates else av.front(heldout)

    def rank(e: Entry):
        return (av.mean(e, heldout, w), av.mean(e, heldout, [1.0] * len(av.tasks)), -e.order)

    def meets(e: Entry, skip: int | None = None) -> bool:
        return all(e.scores(heldout)[k] >= m for k, m in minimums.items() if k != skip)

    feasible = sorted((e for e in pool if meets(e)), key=rank, reverse=True)
    if not feasible:
        raise EvomergeError(_infeasible(av, pool, minimums, heldout, all_candidates))
    choice = feasible[0]
    result = Pick(choice, av.mean(choice, heldout, w), w, minimums, pool, feasible, heldout, all_candidates,
                  feasible[1] if len(feasible) > 1 else None)
    for k in minimums:
        alone = max((e for e in pool if meets(e, skip=k)), key=rank)
        if alone.recipe_hash != choice.recipe_hash:
            result.binding[k] = alone
    sources = [b for b in av.baselines if b.kind == SOURCE and b.scores(heldout) is not None]
    result.best_source = max(sources, key=lambda b: av.mean(b, heldout, w), default=None)
    return result


def _infeasible(av: ArchiveView, pool: list[Entry], minimums: dict[int, float], heldout: bool,
                all_candidates: bool) -> str:
    basis = "held-out" if heldout else "search"
    where = f"the {len(pool)} candidates" if all_candidates else f"the {len(pool)} front members"
    lines = [f"no candidate meets every minimum on {basis} scores (among {where}); best achievable:"]
    every = True
    for k, m in minimums.items():
        best = max(pool, key=lambda e: e.scores(heldout)[k])
        value = best.scores(heldout)[k]
        ok = value >= m
        every &= ok
        lines.append(f"  {av.tasks[k]} >= {m:g}: best {value:.3f} (candidate {best.id})"
                     + ("" if ok else f", {m - value:.3f} short"))
    if every:
        closest = min(pool, key=lambda e: sum(max(0.0, m - e.scores(heldout)[k]) for k, m in minimums.items()))
        short = ", ".join(f"{av.tasks[k]} {closest.scores(heldout)[k]:.3f} < {m:g}"
                          for k, m in minimums.items() if closest.scores(heldout)[k] < m)
        lines.append(f"  each minimum is met by some candidate, but none meets them all together; the closest, "
                     f"candidate {closest.id}, has {short}")
    return "\n".join(lines)


def pick_text(av: ArchiveView, p: Pick) -> str:
    """The choice, its scores next to the runner-up and the best source alone, and why."""
    basis = "held-out" if p.heldout else "search"
    names = ", ".join(f"{t}={w:g}" for t, w in zip(av.tasks, p.weights, strict=True))
    c = p.choice
    lines = [f"pick      candidate {c.id} (recipe {c.recipe_hash[:12]})"
             + (f", also asked as {', '.join(map(str, c.ids[1:]))}" if len(c.ids) > 1 else ""),
             f"weights   {names} (weighted mean of {basis} scores)"]
    if p.minimums:
        lines.append("require   " + ", ".join(f"{av.tasks[k]} >= {m:g}" for k, m in p.minimums.items()))
    pool = f"{len(p.pool)} " + ("candidates" if p.all_candidates else f"candidates on the {basis} front")
    among = (f"of the {len(p.feasible)} meeting every minimum, out of {pool}" if p.minimums else f"of the {pool}")
    lines.append(f"why       the highest weighted mean, {p.value:.4f}, {among}")
    for k, m in p.minimums.items():
        slack = c.scores(p.heldout)[k] - m
        if k in p.binding:
            alt = p.binding[k]
            lines.append(f"          {av.tasks[k]} >= {m:g} binds (slack {slack:.3f}): without it candidate "
                         f"{alt.id} would win ({av.mean(alt, p.heldout, p.weights):.4f}, {av.tasks[k]} "
                         f"{alt.scores(p.heldout)[k]:.3f})")
        else:
            lines.append(f"          {av.tasks[k]} >= {m:g} does not change the choice (slack {slack:.3f})")
    if p.runner_up is not None:
        r = p.runner_up
        lines.append(f"runner-up candidate {r.id}: {av.mean(r, p.heldout, p.weights):.4f} "
                     f"({p.value - av.mean(r, p.heldout, p.weights):.4f} below)")
    else:
        lines.append("runner-up none: no other candidate meets every minimum")
    rows = [_row(av, p, f"choice: candidate {c.id}", c)]
    if p.runner_up is not None:
        rows.append(_row(av, p, f"runner-up: candidate {p.runner_up.id}", p.runner_up))
    s = p.best_source
    if s is not None:
        rows.append(_row(av, p, f"best source alone: {s.name}", s))
        rows.append(["choice - best source", *[f"{a - b:+.3f}" for a, b in zip(
            c.scores(p.heldout), s.scores(p.heldout), strict=True)],
            f"{p.value - av.mean(s, p.heldout, p.weights):+.4f}"])
    lines += ["", *table([f"{basis} scores", *av.tasks, "weighted mean"], rows, set(range(1, len(av.tasks) + 2)))]
    if s is not None and av.mean(s, p.heldout, p.weights) > p.value:
        ok = all(s.scores(p.heldout)[k] >= m for k, m in p.minimums.items())
        lines.append(f"\nnote: '{s.name}' scores higher on these weights "
                     + ("and meets every minimum: the search found no merge that beats it" if ok
                        else "but misses a minimum"))
    lines.append(f"\nexport    evomerge export {av.run_dir} --candidate {c.id}")
    return "\n".join(lines)


def _row(av: ArchiveView, p: Pick, label: str, e: Entry) -> list[str]:
    return [label, *[f"{v:.3f}" for v in e.scores(p.heldout)], f"{av.mean(e, p.heldout, p.weights):.4f}"]


def _pick_cmd(args: argparse.Namespace) -> int:
    av = load_archive(args.run_dir)
    result = pick(av, parse_assignments(av, args.weights, "--weights"), parse_assignments(av, args.min, "--min"),
                  all_candidates=args.all, heldout=args.on == "heldout")
    print(result.candidate_id if args.id_only else pick_text(av, result))
    return 0


def add_pick_parser(sub) -> argparse.ArgumentParser:
    """Register ``evomerge pick RUN_DIR [--weights ...] [--min ...] [--all] [--on heldout|search] [--id-only]``."""
    p = sub.add_parser("pick", help="choose one candidate by weighted held-out score under minimum scores",
                       description="Choose the candidate with the highest weighted mean of held-out scores "
                                   "among those meeting every --min, from the held-out Pareto front (--all: "
                                   "every candidate). Prints the choice, the runner-up, the best source model "
                                   "alone and which minimums bound the choice.")
    p.add_argument("run_dir", help="a search run directory")
    p.add_argument("--weights", action="append", metavar="TASK=W[,TASK=W]",
                   help="task weights, e.g. add=2,reverse=1 (tasks not named weigh 0; default: the config's)")
    p.add_argument("--min", action="append", metavar="TASK=V[,TASK=V]",
                   help="lowest acceptable held-out score of a task, e.g. reverse=0.5 (repeatable)")
    p.add_argument("--all", action="store_true", help="consider every candidate, not just the front")
    p.add_argument("--on", choices=["heldout", "search"], default="heldout",
                   help="the scores to pick on (default heldout; search scores are optimistic)")
    p.add_argument("--id-only", action="store_true", help="print only the chosen candidate id")
    p.set_defaults(func=_pick_cmd)
    return p
