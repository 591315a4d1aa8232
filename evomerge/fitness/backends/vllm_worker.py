"""Methods mixed into vLLM's worker class, run inside each worker process via ``LLM.collective_rpc``.

``VLLMBackend`` passes ``worker_extension_cls="evomerge.fitness.backends.vllm_worker.WeightUpdater"``
to ``vllm.LLM``; vLLM then adds this class to its worker's bases (so method names must not clash with
the worker's own: they carry an ``evomerge_`` prefix). Only small messages cross the RPC: file paths
and tensor names, never tensors (the RPC serializer turns tensors into lists).

This module is imported inside vLLM's worker processes; it imports nothing heavy at module level.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping


def _stream(sources: Mapping[str, str]) -> Iterator[tuple[str, object]]:
    """(name, tensor) pairs read from memory-mapped safetensors files, one file at a time, in name order.

    Name order keeps a layer's tensors together, so vLLM's layerwise reload processes each layer as
    soon as it is complete instead of buffering several.
    """
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, path in sources.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in sorted(names):
                yield name, f.get_tensor(name)


class WeightUpdater:
    """In-place weight replacement for a live vLLM engine (a worker extension: ``self`` is the worker)."""

    def evomerge_reload_weights(self, sources: dict[str, str]) -> int:
        """Load every tensor in ``sources`` (HF checkpoint name -> safetensors file) into the model.

        Uses the worker's ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``: vLLM
        restores each layer to checkpoint layout, lets the model's own ``load_weights`` map HF names
        onto fused parameters (qkv_proj, gate_up_proj), re-runs ``process_weights_after_loading`` (on
        CPU this repacks the oneDNN GEMM weights; writing into ``layer.weight`` directly would not
        reach them) and copies the result into the original tensors (CUDA graphs stay valid).

        A layer must receive all of its checkpoint tensors: a layer given only some of them would be
        rebuilt with the missing parts uninitialised. ``VLLMBackend`` therefore always sends the full
        checkpoint (the new tensors plus the current source of every other one). Returns the number of
        tensors read.

        Tied weights: vLLM's Llama ties ``lm_head`` to ``embed_tokens`` by sharing the Parameter and
        skips ``lm_head.weight`` when loading, so the reload refreshes only the embedding layer; the
        shared storage gets the new values, but on CPU the LM head's GEMM runs on a copy packed at
        start-up. ``_repack_shared_embeddings`` rebuilds it.
        """
        count = 0

        def counted() -> Iterator[tuple[str, object]]:
            nonlocal count
            for item in _stream(sources):
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        self._evomerge_repack_shared_embeddings()
        return count

    def _evomerge_repack_shared_embeddings(self) -> None:
        """Re-run weight processing for embedding / LM-head layers whose weight another module shares.

        ``UnquantizedEmbeddingMethod.process_weights_after_loading`` keeps the weight and (on CPU only)
        packs a GEMM copy of it for the LM head; elsewhere it does nothing. Relies on vLLM internals:
        ``model_runner.get_model()`` and the layers' ``quant_method``; the tied-embedding test in
        tests/fitness/test_vllm_backend.py fails if they change.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        model = self.model_runner.get_model()
        owners: dict[int, int] = {}
        heads = []
        for module in model.modules():
            weight = module._parameters.get("weight")
            if weight is None or weight.is_meta or weight.numel() == 0:
                continue
            ptr = weight.data_ptr()
            owners[ptr] = owners.get(ptr, 0) + 1
            if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
                heads.append((ptr, module))
        for ptr, module in heads:
            if owners[ptr] > 1:
                module.quant_method.process_weights_after_loading(module)

    def evomerge_worker_pid(self) -> int:
        """The worker's process id: lets tests check that a weight update did not restart the engine."""
        return os.getpid()
