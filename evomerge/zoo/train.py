"""Training pieces of the zoo: a char-level tokenizer, a tiny Llama config, and a plain AdamW loop.

The tokenizer maps each printable ASCII character (and newline) to one token, so every skill's text
round-trips exactly and digits stay single tokens (arithmetic is learnable). Encoding adds ``<s>`` in
front, as Llama tokenizers do, which is what the HF fitness backend expects.

Training examples are ``<s> prompt answer </s>`` with the loss on the answer and ``</s>`` only: the
model learns to answer right after the prompt and to stop.
"""

from __future__ import annotations

import itertools
import logging
import math
import string
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))  # printable ASCII, space and newline
IGNORE = -100


def build_tokenizer():
    """A char-level PreTrainedTokenizerFast: one token per character, ``<s>`` added in front on encode."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARACTERS)}
    # BPE with no merges is a char-level model; without a pre-tokenizer, spaces are ordinary tokens.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


@dataclass(frozen=True)
class ModelSize:
    """Shape of the tiny Llama (full multi-head attention, untied output head)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int = 4
    max_positions: int = 64

    def config(self, vocab_size: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=False,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )


def new_model(size: ModelSize, vocab_size: int, seed: int):
    """A randomly initialized LlamaForCausalLM; the init depends only on ``seed`` and ``size``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(size.config(vocab_size))
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = PAD_ID
    return model


def encode_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answer and EOS only) for (prompt,
    answer) pairs."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    seqs = [p + a + [EOS_ID] for p, a in zip(prompts, answers, strict=True)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (seq, prompt) in enumerate(zip(seqs, prompts, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class Schedule:
    """Optimizer settings of one training stage: AdamW, linear warmup, cosine decay to 10% of ``lr``."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(
    model, tokenizer, stream: Iterator[tuple[str, str]], schedule: Schedule, *, name: str
) -> list[float]:
    """Train ``model`` in place on ``schedule.steps`` batches drawn in order from ``stream``; returns the
    loss of every step.

    Deterministic given the model, the stream and the schedule: no dropout, no shuffling beyond the
    stream's own order; bitwise equal reruns also need the same torch build and thread count (float
    reductions in CPU kernels are ordered by thread).
    """
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": schedule.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=schedule.lr,
        betas=(0.9, 0.98),
    )
    losses: list[float] = []
    every = max(1, schedule.steps // 10)
    for step in range(schedule.steps):
        batch = encode_batch(tokenizer, list(itertools.islice(stream, schedule.batch_size)))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        loss = model(**batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == schedule.steps:
            recent = losses[-every:]
            log.info("%s: step %d/%d, loss %.4f", name, step + 1, schedule.steps, sum(recent) / len(recent))
    model.eval()
    return losses
