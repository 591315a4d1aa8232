"""Tiny HF checkpoints built in-process: a hand-made word-level tokenizer and random Llama / GPT-2 models.

Used by the test suite and the demo: hidden size 32, a few layers, saved as safetensors, loadable with
``AutoModelForCausalLM.from_pretrained``. Experts are the base plus seeded random deltas.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "big", "red", "blue", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "plus", "minus", "equals", "is", "what", "and", "or", "not", "yes", "no", "hello", "world", "model", "merge"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(extra_words: int = 0):
    """A word-level fast tokenizer over WORDS (plus ``extra_words`` made-up words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + list(WORDS) + [f"w{i}" for i in range(extra_words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def llama_config(vocab_size: int, layers: int = 4, hidden: int = 32, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


def save_model(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama(path: str | Path, *, seed: int = 0, layers: int = 4, hidden: int = 32, extra_words: int = 0,
               tie: bool = False, dtype=None) -> Path:
    """A random tiny Llama with its tokenizer, saved at ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    tok = build_tokenizer(extra_words)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(len(tok), layers, hidden, tie))
    if dtype is not None:
        model = model.to(dtype)
    return save_model(model, tok, path)


def tiny_gpt2(path: str | Path, *, seed: int = 0, layers: int = 2) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2)
    return save_model(GPT2LMHeadModel(cfg), tok, path)


def expert_of(base: str | Path, path: str | Path, *, seed: int, scale: float = 0.02) -> Path:
    """``base`` plus a seeded random delta on every float tensor, saved at ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return save_model(model, AutoTokenizer.from_pretrained(base), path)
