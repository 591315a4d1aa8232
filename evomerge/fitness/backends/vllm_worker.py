"""Methods mixed into vLLM's worker class, run inside each worker process via ``LLM.collective_rpc``.

``VLLMBackend`` passes ``worker_extension_cls="evomerge.fitness.backends.vllm_worker.WeightUpdater"``
to ``vllm.LLM``; vLLM then adds this class to its worker's bases (so method names must not clash with
the worker's own: they carry an ``evomerge_`` prefix). Only small messages cross the RPC: a file path,
tensor names, offsets and shapes, never tensors (the RPC serializer turns tensors into lists). The
tensors themselves lie in a shared-memory file that the driver writes and every worker maps once.

This module is imported inside vLLM's worker processes; it imports nothing heavy at module level.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

# vLLM's loggers (``vllm.logger.init_logger(__name__)``) for the layerwise reload and its driver.
_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)
# Their warnings about layers and weights a reload did not receive: expected when only some blocks
# are reloaded (vLLM then keeps those layers' current tensors), and noise for the rotary embedding
# and a tied LM head on every full reload.
_EXPECTED_WARNINGS = ("%s: Failed to load weights", "Following weights were not loaded from checkpoint")


def block_of(name: str) -> str:
    """The numbered block a checkpoint tensor belongs to (``model.layers.12.mlp.up_proj.weight`` ->
    ``model.layers.12``), or "" for tensors outside numbered blocks (embeddings, final norm, LM head).

    vLLM fuses tensors of one module (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``, a
    layer's experts into one MoE weight), and such a module never spans two blocks: a reload that
    sends every tensor of a block always completes every layer it touches.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_EXPECTED_WARNINGS))


@contextlib.contextmanager
def _quiet_reload() -> Iterator[None]:
    drop = _DropExpected()
    loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


class WeightUpdater:
    """In-place weight replacement for a live vLLM engine (a worker extension: ``self`` is the worker)."""

    def evomerge_reload_shared(self, path: str, size: int, tensors: Mapping[str, Sequence]) -> int:
        """Load ``tensors`` from the shared-memory file ``path`` (``size`` bytes) into the model.

        ``tensors`` maps HF checkpoint names to ``(byte offset, dtype name, shape)`` in that file. The
        file is memory-mapped (``MAP_SHARED``) on first use and the mapping kept, so later updates
        read the driver's writes without new page faults; the views are read, never kept.

        Uses the worker's ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``: vLLM
        restores each layer to checkpoint layout, lets the model's own ``load_weights`` map HF names
        onto fused parameters (qkv_proj, gate_up_proj), re-runs ``process_weights_after_loading`` (on
        CPU this repacks the oneDNN GEMM weights; writing into ``layer.weight`` directly would not
        reach them) and copies the result into the original tensors (CUDA graphs stay valid). Layers
        that receive no tensor keep their current ones (vLLM places them back unchanged).

        A layer must receive all of its checkpoint tensors: one given only some of them would be
        rebuilt with the missing parts uninitialised. ``VLLMBackend`` therefore sends whole blocks
        (``block_of``). Returns the number of tensors read.

        Tied weights: vLLM's Llama ties ``lm_head`` to ``embed_tokens`` by sharing the Parameter and
        skips ``lm_head.weight`` when loading, so the reload refreshes only the embedding layer; the
        shared storage gets the new values, but on CPU the LM head's GEMM runs on a copy packed at
        start-up. ``_evomerge_repack_shared_embeddings`` rebuilds it whenever tensors outside the
        numbered blocks were loaded.
        """
        import torch

        data = self._evomerge_map(path, size)
        count = 0

        def views() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            # Name order keeps a layer's tensors together, so vLLM's layerwise reload processes each
            # layer as soon as it is complete instead of buffering several.
            for name in sorted(tensors):
                offset, dtype, shape = tensors[name]
                dt = getattr(torch, dtype)
                nbytes = dt.itemsize
                for dim in shape:
                    nbytes *= dim
                count += 1
                yield name, data[offset : offset + nbytes].view(dt).view(tuple(shape))

        with _quiet_reload():
            self.reload_weights(weights_iterator=views(), is_checkpoint_format=True)
        if any(block_of(name) == "" for name in tensors):
            self._evomerge_repack_shared_embeddings()
        return count

    def _evomerge_map(self, path: str, size: int):
        """The worker's uint8 view of the shared file, mapped once per (path, size)."""
        import torch

        mapped = getattr(self, "_evomerge_mapped", None)
        if mapped is None or mapped[0] != (path, size):
            mapped = ((path, size), torch.from_file(path, shared=True, size=size, dtype=torch.uint8))
            self._evomerge_mapped = mapped
        return mapped[1]

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
