"""Build the tiny model zoo: a base Llama pretrained on the easy slice of every skill, one expert per skill
fine-tuned from it on the skill's hard slice, and the skills' fitness task files, all on CPU in minutes.

The base knows every prompt format and the basic circuits (sums without a carry, reversing 2..3
letters, half of the lexicon: ``skills.PRETRAIN``) and scores about 0 on the scored slices; each expert
trains on its skill plus ``replay`` (a quarter) of the base's corpus, so it keeps the shared basics
and stays as weak as the base on the other skills. See evomerge/zoo/skills.py for the skills.

Layout of ``out_dir``::

    base/                   model (safetensors) + char-level tokenizer
    experts/<skill>/        one per skill in evomerge.zoo.skills.SKILLS, same tokenizer
    tasks/<skill>.yaml      fitness tasks (search / heldout splits); the same bytes as fitness/zoo/
    tasks/data/<skill>.jsonl
    manifest.json           written last: config, its hash, sha256 of every file, timings

Caching: a folder whose manifest has the same config hash and whose files all match their recorded
hashes is returned as is (no training). Anything else in a zoo folder is rebuilt from scratch; a folder
holding files that are not the zoo's is refused rather than overwritten.

Determinism: the base init and every training stream derive from (``seed``, stage name); there is no
dropout; training runs on ``threads`` CPU threads (1 by default: for matrices this small a second thread
gains little, and on a shared machine it loses a lot). Builds with the same config on the same torch
build and CPU give bitwise equal files (tests/zoo checks it in quick mode). 1 and 2 threads also gave
equal bits on the 2-core machine this was written on, but that is not promised: MKL may pick other
kernels for another thread count or CPU, and the weights then differ in the last bits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.zoo import skills as _skills
from evomerge.zoo.train import CHARACTERS, ModelSize, Schedule

log = logging.getLogger(__name__)

ZOO_FORMAT = 1  # bump when training code changes what a config builds: cached zoos then rebuild
MANIFEST = "manifest.json"
_OWNED = {"base", "experts", "tasks", MANIFEST, MANIFEST + ".tmp"}


@dataclass(frozen=True)
class ZooConfig:
    """Everything a zoo depends on besides the code: model shape, the training stage of the base and of
    each expert (keyed by skill name, every skill), the base's task mixture (names in skills.PRETRAIN or
    skills.SKILLS -> weight), the share of each expert batch replayed from it, the seed and the CPU
    thread count used for training."""

    seed: int
    size: ModelSize
    base: Schedule
    experts: dict[str, Schedule]
    base_mixture: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_skills.PRETRAIN, 1.0))
    replay: float = 0.25
    threads: int = 1

    def expert_mixture(self, skill: str) -> dict[str, float]:
        """An expert's training tasks: its skill, plus ``replay`` of the base's mixture."""
        total = sum(self.base_mixture.values())
        mixture = {name: self.replay * w / total for name, w in self.base_mixture.items() if self.replay > 0}
        mixture[skill] = mixture.get(skill, 0.0) + 1.0 - self.replay
        return mixture

    def digest(self) -> str:
        """SHA-256 over the config, the zoo format, the task files and the tokenizer's characters."""
        tasks = {rel: hashlib.sha256(data).hexdigest() for rel, data in _skills.task_files().items()}
        payload = {
            "format": ZOO_FORMAT,
            "config": dataclasses.asdict(self),
            "tasks": tasks,
            "lexicon": _skills.LEXICON,
            "characters": "".join(CHARACTERS),
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def zoo_config(*, seed: int = 0, quick: bool = False) -> ZooConfig:
    """The preset configs. Quick (for tests): hidden 64, 2 layers, about 30 s on one core. Full: hidden
    128, 3 layers, a few minutes. Expert steps differ by skill: each gets about what it needs to pass 0.9
    held-out accuracy in full mode (reverse, a length generalization, is the slowest)."""
    if quick:
        size = ModelSize(hidden=64, layers=2, intermediate=256, heads=4)
        base = Schedule(steps=400, lr=3e-3, batch_size=32, warmup=30)
        steps, lr = {"add": 300, "reverse": 400, "lexicon": 200}, 2e-3
    else:
        size = ModelSize(hidden=128, layers=3, intermediate=384, heads=4)
        base = Schedule(steps=800, lr=2e-3, batch_size=32, warmup=50)
        steps, lr = {"add": 700, "reverse": 800, "lexicon": 500}, 1e-3
    experts = {name: Schedule(steps=steps[name], lr=lr, batch_size=32, warmup=20) for name in _skills.SKILLS}
    return ZooConfig(seed=seed, size=size, base=base, experts=experts)


@dataclass(frozen=True)
class ZooPaths:
    """Where a built zoo's pieces are: model folders (loadable with ``from_pretrained``), task YAMLs."""

    root: Path
    base: Path
    experts: dict[str, Path]
    tasks: dict[str, Path]
    manifest: Path
    config_hash: str = field(default="", compare=False)

    @property
    def models(self) -> dict[str, Path]:
        """Every model folder by name: 'base', then the experts by skill name."""
        return {"base": self.base, **self.experts}


def _paths(root: Path, config_hash: str = "") -> ZooPaths:
    return ZooPaths(
        root=root,
        base=root / "base",
        experts={name: root / "experts" / name for name in _skills.SKILLS},
        tasks={name: root / "tasks" / f"{name}.yaml" for name in _skills.SKILLS},
        manifest=root / MANIFEST,
        config_hash=config_hash,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of a complete zoo at ``out_dir`` (every recorded file present with its hash), else None."""
    root = Path(out_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file() or _sha256(path) != digest:
            log.info("zoo at %s: %s is missing or changed", root, rel)
            return None
    return manifest


def build_zoo(
    out_dir: str | Path, *, seed: int = 0, quick: bool = False, config: ZooConfig | None = None
) -> ZooPaths:
    """Build the zoo at ``out_dir`` (or return it untouched if a complete build of the same config is
    there). ``config`` overrides the preset chosen by ``seed`` and ``quick``."""
    config = config or zoo_config(seed=seed, quick=quick)
    if set(config.experts) != set(_skills.SKILLS):
        raise ValueError(
            f"config.experts: has {sorted(config.experts)}; give a schedule for each of {', '.join(_skills.SKILLS)}"
        )
    if not 0 <= config.replay < 1:
        raise ValueError(f"config.replay: {config.replay} is not in [0, 1)")
    root = Path(out_dir)
    digest = config.digest()
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("config_hash") == digest:
        log.info("zoo at %s is complete and current (config %s); nothing to do", root, digest[:12])
        return _paths(root, digest)
    _clear(root)
    started = time.perf_counter()
    timings = _train_all(root, config)
    _write_manifest(root, config, digest, timings, time.perf_counter() - started)
    log.info("zoo built at %s in %.1f s", root, time.perf_counter() - started)
    return _paths(root, digest)


def _clear(root: Path) -> None:
    """Remove a previous (incomplete or outdated) zoo build; refuse folders holding anything else."""
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"zoo output {root} exists and is not a folder")
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWNED)
        if foreign:
            raise ValueError(
                f"zoo output {root} holds files that are not a zoo's ({', '.join(foreign[:5])}); "
                "give an empty or zoo folder"
            )
    (root / MANIFEST).unlink(missing_ok=True)  # first: an interrupted build is never taken as complete
    for name in ("base", "experts", "tasks"):
        shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def _stage_seed(seed: int, stage: str) -> int:
    """A 63-bit torch seed derived from (run seed, stage name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}".encode()).digest()[:8], "big") >> 1


def _train_all(root: Path, config: ZooConfig) -> dict[str, float]:
    import torch

    from evomerge.zoo import train

    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    timings: dict[str, float] = {}
    try:
        paths = _paths(root)
        _skills.write_task_files(root / "tasks")
        exclude = _skills.evaluated_prompts()
        tokenizer = train.build_tokenizer()

        t = time.perf_counter()
        base = train.new_model(config.size, len(tokenizer), _stage_seed(config.seed, "base-init"))
        stream = _skills.training_stream(config.base_mixture, config.seed, "base", exclude=exclude)
        train.train(base, tokenizer, stream, config.base, name="base")
        _save(base, tokenizer, paths.base)
        timings["base"] = time.perf_counter() - t

        for name, schedule in config.experts.items():
            t = time.perf_counter()
            expert = copy.deepcopy(base)
            stream = _skills.training_stream(
                config.expert_mixture(name), config.seed, f"expert:{name}", exclude=exclude
            )
            train.train(expert, tokenizer, stream, schedule, name=f"expert {name}")
            _save(expert, tokenizer, paths.experts[name])
            timings[f"expert:{name}"] = time.perf_counter() - t
    finally:
        torch.set_num_threads(previous)
    return timings


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' tqdm bars (writing shards, loading weights) off inside, restored after."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)


def _write_manifest(root: Path, config: ZooConfig, digest: str, timings: dict, seconds: float) -> None:
    import torch
    import transformers

    files = {
        p.relative_to(root).as_posix(): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp")
    }
    manifest = {
        "zoo_format": ZOO_FORMAT,
        "config_hash": digest,
        "config": dataclasses.asdict(config),
        "files": files,
        "seconds": {"total": round(seconds, 1), **{k: round(v, 1) for k, v in timings.items()}},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(root / MANIFEST)


def score_matrix(paths: ZooPaths, split: str = "heldout", **backend_options) -> dict[str, dict[str, float]]:
    """Mean score of every zoo model on every skill's ``split``: ``{model: {skill: score}}``, scored
    with the fitness layer (``evaluate`` on an ``HFBackend``)."""
    from evomerge.fitness.backends.hf import HFBackend
    from evomerge.fitness.evaluate import evaluate
    from evomerge.fitness.task import load_task

    tasks = {name: load_task(path) for name, path in paths.tasks.items()}
    matrix = {}
    for model, path in paths.models.items():
        with _no_progress_bars():
            backend = HFBackend(path, **backend_options)
        matrix[model] = {name: evaluate(task, split, backend).metrics["mean"] for name, task in tasks.items()}
    return matrix


def format_matrix(matrix: dict[str, dict[str, float]]) -> str:
    """The score matrix as a plain-text table, one row per model."""
    columns = list(next(iter(matrix.values())))
    lines = ["model".ljust(10) + "".join(c.rjust(10) for c in columns)]
    lines += [m.ljust(10) + "".join(f"{row[c]:10.2f}" for c in columns) for m, row in matrix.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the zoo (``evomerge zoo build OUT_DIR [--seed N] [--quick] [--scores]``)."""
    parser = argparse.ArgumentParser(
        prog="evomerge zoo build",
        description="Build the tiny model zoo (a base, one expert per skill, the skills' fitness tasks) "
        "on CPU; a complete build of the same config in OUT_DIR is reused.",
    )
    parser.add_argument("out_dir", help="folder for the zoo (created; a complete build there is reused)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="the smaller, faster test preset")
    parser.add_argument("--scores", action="store_true", help="print every model's heldout score per skill")
    args = parser.parse_args(argv)
    paths = build_zoo(args.out_dir, seed=args.seed, quick=args.quick)
    out = [f"zoo: {paths.root}", *(f"{name}: {path}" for name, path in paths.models.items())]
    if args.scores:
        out += ["heldout scores:", format_matrix(score_matrix(paths))]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    raise SystemExit(main())
