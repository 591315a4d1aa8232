"""``evomerge pareto RUN_DIR --plot FILE.png``: the front in objective space and hypervolume over time.

One panel per pair of objectives (a single panel for two tasks): every evaluated candidate faded, the
Pareto-front members highlighted and labelled with their candidate ids, each source model alone and each
default merge marked and named. A last panel shows the hypervolume after every evaluation, on search and
held-out scores, against the hypervolume of the source models alone. matplotlib is imported here only, with
the Agg backend (no display needed).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.search.archive_view import MERGE, SOURCE, ArchiveView, Entry

FRONT, SOURCE_C, MERGE_C, FADED = "#1f77b4", "#d62728", "#2ca02c", "#9e9e9e"
DPI = 110


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise EvomergeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_archive(av: ArchiveView, path: str | Path, heldout: bool = False) -> Path:
    """Draw the run's front (search scores, or held-out with ``heldout``) into ``path`` (PNG, PDF, SVG...)."""
    plt = _pyplot()
    names = av.objective_names
    pairs = list(itertools.combinations(range(len(names)), 2)) or [(0, None)]
    panels = len(pairs) + 1
    cols = 2 if panels <= 4 else 3
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 5.6 * rows), squeeze=False, dpi=DPI)
    flat = list(axes.flat)
    front = av.front(heldout)
    labels = [(ax, _scatter(ax, av, front, i, j, heldout)) for ax, (i, j) in zip(flat, pairs, strict=False)]
    _hypervolume(flat[len(pairs)], av)
    for ax in flat[panels:]:
        ax.set_visible(False)
    basis = "held-out" if heldout else "search"
    state = "finished" if av.run.ended else "still running or interrupted"
    fig.suptitle(f"{av.config.name}: {av.config.optimizer.name} search, {len(av.candidates)} candidates "
                 f"evaluated ({state})\nPareto front on {basis} scores: the {len(front)} candidate(s) that no other "
                 f"candidate beats on one {'objective' if av.with_cost else 'task'} without losing on another",
                 fontsize=13)
    kinds = {b.kind for b in av.baselines}
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=FADED, alpha=0.5, label="evaluated candidate"),
        plt.Line2D([], [], ls="", marker="o", mfc=FRONT, mec="black", ms=8, label="Pareto-front candidate (id)"),
    ]
    if SOURCE in kinds:
        handles.append(plt.Line2D([], [], ls="", marker="*", color=SOURCE_C, ms=13, label="source model alone"))
    if MERGE in kinds:
        handles.append(plt.Line2D([], [], ls="", marker="D", color=MERGE_C, ms=8, label="default merge"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.93))
    for ax, these in labels:  # placed once the layout is final: they avoid each other in pixels
        _labels(ax, these)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _value(av: ArchiveView, e: Entry, k: int | None, heldout: bool) -> float | None:
    """Coordinate k of an entry: a task score, or the path length itself (cost, lower is better)."""
    if k is None:
        return float(e.order + 1)
    if av.with_cost and k == len(av.tasks):
        return e.cost if e.scores(heldout) is not None else None  # a baseline has no path length
    point = e.scores(heldout)
    return None if point is None else point[k]


def _axis_label(av: ArchiveView, k: int | None, heldout: bool) -> str:
    if k is None:
        return "evaluation"
    if av.with_cost and k == len(av.tasks):
        return "path length (layers; axis reversed: shorter is up)"
    return f"{av.tasks[k]} score ({'held-out' if heldout else 'search'} split)"


def _scatter(ax, av: ArchiveView, front: list[Entry], i: int, j: int | None, heldout: bool) -> list:
    """Draw one panel's points; returns the labels to place, (x, y, text, color)."""
    if j is None:  # one objective: score against evaluation order
        i, j = None, 0
    members = {e.recipe_hash for e in front}
    xs, ys = [], []
    for e in av.candidates:
        x, y = _value(av, e, i, heldout), _value(av, e, j, heldout)
        if x is not None and y is not None and e.recipe_hash not in members:
            xs.append(x)
            ys.append(y)
    ax.scatter(xs, ys, s=28, color=FADED, alpha=0.45, lw=0, zorder=2)
    points = [(x, y, e) for e in front
              if (x := _value(av, e, i, heldout)) is not None and (y := _value(av, e, j, heldout)) is not None]
    if i is not None and len(av.objective_names) == 2 and points:
        _staircase(ax, [(x, y) for x, y, _ in points], av.with_cost)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=60, color=FRONT, edgecolor="black",
               lw=0.8, zorder=4)
    labels = [(x, y, str(e.id), FRONT) for x, y, e in points]
    for kind, marker, color, size in ((SOURCE, "*", SOURCE_C, 220), (MERGE, "D", MERGE_C, 70)):
        pts = [(x, y, b.name) for b in av.baselines if b.kind == kind
               and (x := _value(av, b, i, heldout)) is not None and (y := _value(av, b, j, heldout)) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=size, color=color,
                   edgecolor="black", lw=0.6, zorder=5)
        labels += [(x, y, name, color) for x, y, name in pts]
    for k, setter, invert in ((i, ax.set_xlim, ax.invert_xaxis), (j, ax.set_ylim, ax.invert_yaxis)):
        if k is not None and av.with_cost and k == len(av.tasks):
            invert()  # shorter paths are better: up and right stays the better direction
        elif k is not None:
            setter(-0.04, 1.12)
    ax.set_xlabel(_axis_label(av, i, heldout))
    ax.set_ylabel(_axis_label(av, j, heldout))
    if i is not None:
        ax.set_title(f"{av.objective_names[i]} vs {av.objective_names[j]}"
                     + (" (a projection: the front is over all objectives)" if len(av.objective_names) > 2 else ""),
                     fontsize=11)
    ax.grid(alpha=0.3)
    if i is not None:
        ax.text(0.99, 0.99, "better: up and right \u2197", transform=ax.transAxes, ha="right", va="top", fontsize=9,
                color="#555555")
    return labels


def _staircase(ax, xy: list[tuple[float, float]], with_cost: bool) -> None:
    """The 2-D front as a step line between its members (what it dominates lies below and to the left)."""
    if with_cost:  # x or y is a cost: a step line would point the wrong way; connect in order instead
        xy = sorted(xy)
        ax.plot([p[0] for p in xy], [p[1] for p in xy], color=FRONT, lw=1.2, alpha=0.6, zorder=3)
        return
    xy = sorted(xy, key=lambda p: (-p[0], p[1]))
    sx, sy = [xy[0][0]], [xy[0][1]]
    for x, y in xy[1:]:
        sx += [x, x]
        sy += [sy[-1], y]
    ax.plot(sx, sy, color=FRONT, lw=1.2, alpha=0.6, zorder=3)


OFFSETS = [(8, 6), (8, -14), (-8, 6), (-8, -14), (8, 18), (-8, 18), (8, -26), (-8, -26), (8, 30), (-8, 30),
           (8, -38), (-8, -38), (0, 42), (0, -50)]  # points: where a label may go around its point


def _labels(ax, labels: list[tuple[float, float, str, str]]) -> None:
    """Name points without overlaps: labels of coinciding points are joined; then, baselines first, each
    label takes the first place around its point (OFFSETS) that overlaps no label or marker already there
    and stays inside the panel (else the last place tried), with a thin line to its point."""
    joined: dict[tuple[float, float, str], list[str]] = {}
    for x, y, text, color in sorted(labels, key=lambda t: t[3] == FRONT):
        joined.setdefault((round(x, 6), round(y, 6), color), []).append(text)
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    r = 5 * ax.figure.dpi / 72  # a marker's half-width, in pixels
    placed = [Bbox.from_extents(px - r, py - r, px + r, py + r)
              for px, py in (ax.transData.transform((x, y)) for x, y, _ in joined)]
    for (x, y, color), texts in joined.items():
        if color == FRONT:
            text = ", ".join(texts) if len(texts) <= 6 else f"{', '.join(texts[:5])} +{len(texts) - 5}"
        else:
            text = "\n".join(texts)
        for dx, dy in OFFSETS:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                               ha="left" if dx >= 0 else "right", va="bottom" if dy > 0 else "top",
                               fontsize=9, color=color, fontweight="normal" if color == FRONT else "bold", zorder=6,
                               bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
                               arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.7,
                                           "shrinkA": 0, "shrinkB": 4})
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text alone, not the line to its point
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in placed):
                break
            if (dx, dy) != OFFSETS[-1]:
                note.remove()
        placed.append(box)


def _hypervolume(ax, av: ArchiveView) -> None:
    n = len(av.candidates)
    steps = list(range(1, n + 1))
    ax.plot(steps, av.hypervolume_history(False), color=FRONT, lw=2, label="front on search scores")
    if any(e.heldout for e in av.candidates):
        ax.plot(steps, av.hypervolume_history(True), color="#ff7f0e", lw=2, ls="--",
                label="front on held-out scores")
    sources = [b for b in av.baselines if b.kind == SOURCE]
    if sources and av.hypervolume_of(sources) > 0:
        ax.axhline(av.hypervolume_of(sources), color=SOURCE_C, lw=1, ls=":",
                   label="source models alone (search)")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume (area/volume the front dominates)")
    ax.set_title("Progress: hypervolume after each evaluation (higher is better)", fontsize=11)
    ax.set_xlim(0, max(n, 1) + 0.5)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    if n and max(av.hypervolume_history(False)) == 0:
        ax.text(0.5, 0.5, "0 so far: no candidate scores above 0 on every task\n(the reference point is 0 for "
                "each task)", transform=ax.transAxes, ha="center", va="center", fontsize=10, color="#555555")
