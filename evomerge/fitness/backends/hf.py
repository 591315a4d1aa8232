"""The embedded HF transformers backend: one resident causal LM answering request batches (CPU default).

Tokenization (shared by ``generate`` and ``loglikelihood``):

- A prompt / context is encoded with the tokenizer's own special tokens (``add_special_tokens=True``: a
  BOS for Llama-style tokenizers, nothing for tokenizers without a post-processor). An empty encoding is
  replaced by ``[bos]`` (or ``[eos]`` when there is no BOS), so every sequence has a first position.
- A continuation is encoded separately, without special tokens, and its ids are appended to the
  context's ids (lm-evaluation-harness's context/continuation split). Trailing whitespace of the context
  is moved to the front of the continuation first, as the harness does, so that "Answer: " + "B" and
  "Answer:" + " B" score the same tokens. Encoding the two parts separately means the scored tokens are
  exactly the continuation's own tokens for every context (no BPE merge across the boundary can move
  context characters into the continuation or the reverse); the price is that ids(context) + ids(cont)
  can differ from ids(context + cont) at the boundary for subword tokenizers.
- Sequences longer than ``max_length`` lose tokens on the left (the context side), never on the right.

Padding: generation pads on the left (prompts end where decoding starts; position ids follow the
attention mask inside ``model.generate``); scoring pads on the right (causal attention never looks right,
so real positions are unaffected and need no position shift). Requests are sorted by length into
batches and answers returned in request order.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from evomerge.fitness.backends.text import PairEncoder, cut_at_stop
from evomerge.fitness.requests import GenerateRequest, Loglikelihood, LoglikelihoodRequest

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype | str:
    """None means float32 on CPU (fast, exact kernels) and the checkpoint's dtype elsewhere."""
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not one of: None, 'auto', a torch.dtype, {sorted(_DTYPES)}")


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; an unknown kwarg would be ignored silently."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@functools.cache
def _stop_criteria_class():
    """A per-row StoppingCriteria (defined lazily: transformers is imported where it is used)."""
    from transformers import StoppingCriteria

    class RowStop(StoppingCriteria):
        """Marks a row done once it has its own ``max_new_tokens`` or its decoded text holds a stop string.

        EOS is handled by ``generate`` itself; ``generate`` ends when every row is done.
        """

        def __init__(self, tokenizer, prompt_len: int, limits: list[int], stops: list[tuple[str, ...]]):
            self.tokenizer = tokenizer
            self.prompt_len = prompt_len
            self.limits = limits
            self.stops = stops
            self.done = [False] * len(limits)

        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            new = input_ids[:, self.prompt_len :]
            for row, (limit, stop) in enumerate(zip(self.limits, self.stops, strict=True)):
                if self.done[row]:
                    continue
                if new.shape[1] >= limit:
                    self.done[row] = True
                elif stop:
                    text = self.tokenizer.decode(new[row].tolist(), skip_special_tokens=True)
                    self.done[row] = cut_at_stop(text, stop)[1]
            return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    return RowStop


class HFBackend:
    """A resident ``AutoModelForCausalLM`` answering GenerateRequest / LoglikelihoodRequest batches.

    ``model_path`` is a local checkpoint directory (never fetched from a hub). ``dtype`` None means
    float32 on CPU and the checkpoint's dtype on other devices. ``max_length`` (tokens, prompt plus
    continuation) defaults to the model's position limit. ``batch_size`` is the number of sequences per
    forward pass; it changes speed, not answers (up to float rounding).
    """

    name = "hf"

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_path, local_files_only=True, trust_remote_code=trust_remote_code
        )
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            **{_dtype_kwarg(): _resolve_dtype(dtype, device)},
        )
        self.model.to(self.device)
        self.model.eval()
        self.dtype = self.model.dtype
        # Name -> the live Parameter / buffer (tied names share one object). load_weights copies into
        # these in place, so the table stays valid for the backend's life.
        self._tensors = self.model.state_dict(keep_vars=True)

        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        # Padded positions are masked out, so any id serves when the tokenizer has no pad/eos token.
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.encoder = PairEncoder(self.tokenizer, [start if start is not None else self.pad_id])
        self.max_length = max_length or self._model_max_length()

    def _model_max_length(self) -> int:
        cfg = self.model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(text_cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        return tok_max if isinstance(tok_max, int) and 0 < tok_max < 1_000_000 else 2048

    def describe(self) -> dict[str, str]:
        """What a score depends on besides the weights: for score keys (weights are the caller's to hash)."""
        return {
            "backend": self.name,
            "model": str(self.model_path),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": str(self.max_length),
        }

    # -- generate --------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Greedy continuations, one per request, in order (see the module docstring for batching)."""
        encoded = [self.encoder.prompt(req.prompt, req.max_new_tokens, self.max_length) for req in requests]
        # Similar budgets and prompt lengths share a batch: less padding, fewer wasted decode steps.
        order = sorted(range(len(requests)), key=lambda i: (requests[i].max_new_tokens, len(encoded[i])))
        out: list[str] = [""] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            texts = self._generate_batch([encoded[i] for i in chunk], [requests[i] for i in chunk])
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text
        return out

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], reqs: list[GenerateRequest]) -> list[str]:
        from transformers import GenerationConfig, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        limits = [r.max_new_tokens for r in reqs]
        stops = [tuple(r.stop) for r in reqs]
        # A fresh config: pure greedy, ignoring any sampling defaults shipped with the checkpoint.
        config = GenerationConfig(
            max_new_tokens=max(limits),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        criteria = _stop_criteria_class()(self.tokenizer, width, limits, stops)
        seqs = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([criteria]),
        )
        texts = []
        for row, (limit, stop) in enumerate(zip(limits, stops, strict=True)):
            new = seqs[row, width : width + limit].tolist()
            cut = next((k for k, t in enumerate(new) if t in self.eos_ids), len(new))
            text = self.tokenizer.decode(new[:cut], skip_special_tokens=True)
            texts.append(cut_at_stop(text, stop)[0])
        return texts

    # -- loglikelihood ---------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """Summed log-prob (nats) of each continuation's tokens given its context, in request order.

        An empty continuation scores (0.0, 0 tokens, greedy). A continuation longer than
        ``max_length`` tokens cannot be scored and raises ValueError.
        """
        pairs = []
        for req in requests:
            ctx, cont = self.encoder.pair(req.context, req.continuation)
            if len(cont) > self.max_length:
                raise ValueError(
                    f"continuation of {len(cont)} tokens does not fit max_length "
                    f"{self.max_length}: {req.continuation[:40]!r}"
                )
            # The model sees all but the last token; keep at most max_length of them (drop on the left).
            seq = (ctx + cont)[-(self.max_length + 1) :]
            pairs.append((seq, len(cont)))
        out = [Loglikelihood(logprob=0.0, num_tokens=0, is_greedy=True)] * len(requests)
        # Longest first (as the harness does): the first batch shows the peak memory, padding stays small.
        todo = sorted((i for i in range(len(requests)) if pairs[i][1] > 0), key=lambda i: -len(pairs[i][0]))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for i, answer in zip(chunk, self._score_batch([pairs[i] for i in chunk]), strict=True):
                out[i] = answer
        return out

    @torch.inference_mode()
    def _score_batch(self, pairs: list[tuple[list[int], int]]) -> list[Loglikelihood]:
        inputs = [seq[:-1] for seq, _ in pairs]
        width = max(len(x) for x in inputs)
        ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        ).logits
        answers = []
        for row, (seq, n_cont) in enumerate(pairs):
            # Position p predicts token p + 1: the continuation's predictions are the last n_cont inputs.
            end = len(seq) - 1
            rows = logits[row, end - n_cont : end].float().log_softmax(dim=-1)
            target = torch.tensor(seq[-n_cont:], dtype=torch.long, device=rows.device)
            logprob = rows.gather(1, target[:, None]).sum().item()
            greedy = bool((rows.argmax(dim=-1) == target).all())
            answers.append(Loglikelihood(logprob=logprob, num_tokens=n_cont, is_greedy=greedy))
        return answers

    # -- weights ---------------------------------------------------------------------------------------

    def load_weights(self, tensors: Mapping[str, object]) -> None:
        """Copy ``tensors`` (HF state-dict names) into the resident model's parameters, in place.

        Only the names given change. Tensors are cast to each parameter's dtype and device. For tied
        weights (e.g. ``lm_head.weight`` sharing ``model.embed_tokens.weight``) either name works; giving
        both with different values is an error. Every name and shape is checked before anything is
        copied, so a bad mapping leaves the model untouched. Unknown names and shape mismatches raise
        ValueError naming the tensor. The model is never reloaded.
        """
        state = self._tensors
        plan: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name not in state:
                raise ValueError(
                    f"unknown tensor name {name!r} for {self.model_path} ({type(self.model).__name__})"
                )
            target = state[name]
            if not isinstance(value, torch.Tensor):
                try:
                    value = torch.as_tensor(value)
                except (TypeError, ValueError, RuntimeError) as err:
                    raise TypeError(f"tensor {name!r} is a {type(value).__name__}, not a tensor") from err
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
                )
            key = id(target)  # tied names share one Parameter object
            if key in plan:
                other, _, previous = plan[key]
                if not torch.equal(
                    previous.to(target.device, target.dtype), value.to(target.device, target.dtype)
                ):
                    raise ValueError(f"tied tensors {other!r} and {name!r} were given different values")
                continue
            plan[key] = (name, target, value)
        with torch.no_grad():
            for _, target, value in plan.values():
                target.copy_(value)
