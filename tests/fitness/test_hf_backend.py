"""HFBackend on tiny in-process Llamas: greedy generation, scoring, and in-place weight replacement."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from evomerge.fitness.requests import Backend, GenerateRequest, LoglikelihoodRequest
from evomerge.zoo.tiny import WORDS, expert_of, tiny_llama

PROMPTS = [
    "the cat sat on",
    "hello",
    "one two three four five six",
    "what is two plus two",
    "the",
    "a big red dog ran to the mat and",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_backend")
    a = tiny_llama(root / "a", seed=0, layers=2)
    return {
        "a": a,
        "b": expert_of(a, root / "b", seed=1),
        "tied": tiny_llama(root / "tied", seed=3, layers=2, tie=True),
    }


@pytest.fixture(scope="module")
def backend(models):
    from evomerge.fitness.backends import HFBackend

    return HFBackend(models["a"])


def fresh(path, **kwargs):
    from evomerge.fitness.backends.hf import HFBackend

    return HFBackend(path, **kwargs)


def manual_loglikelihood(be, context: str, continuation: str) -> tuple[float, int]:
    """Reference: one unpadded forward pass over ids(context) + ids(continuation)."""
    ctx = be.tokenizer(context)["input_ids"]
    cont = be.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = be.model(torch.tensor([ctx + cont])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    total = sum(logprobs[len(ctx) - 1 + k, tok].item() for k, tok in enumerate(cont))
    return total, len(cont)


# -- identity ---------------------------------------------------------------------------------------------


def test_is_a_backend_and_describes_itself(backend, models):
    assert isinstance(backend, Backend)
    assert backend.name == "hf"
    assert backend.describe() == {
        "backend": "hf",
        "model": str(models["a"]),
        "device": "cpu",
        "dtype": "float32",
        "max_length": "128",
    }
    assert not backend.model.training


def test_importing_backends_package_stays_light():
    code = (
        "import sys, evomerge, evomerge.fitness.backends as b; "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'; "
        "assert b.BACKENDS['hf'].endswith(':HFBackend')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_backend_name_lists_allowed():
    from evomerge.fitness.backends import backend_class

    with pytest.raises(ValueError, match="'hf'"):
        backend_class("nope")


# -- generate ---------------------------------------------------------------------------------------------


def test_generate_returns_continuations_within_budget(backend):
    for budget in (1, 4):
        outs = backend.generate([GenerateRequest(p, max_new_tokens=budget) for p in PROMPTS])
        assert len(outs) == len(PROMPTS)
        for out in outs:
            assert isinstance(out, str)
            assert 1 <= len(out.split()) <= budget
            assert set(out.split()) <= set(WORDS)
    # Greedy continuations are prefix-consistent: a smaller budget is a word prefix of a larger one.
    short, long = backend.generate([GenerateRequest(PROMPTS[0], 2), GenerateRequest(PROMPTS[0], 8)])
    assert len(short.split()) == 2
    assert long.split()[:2] == short.split()


def test_generate_batched_equals_one_by_one(backend, monkeypatch):
    reqs = [GenerateRequest(p, max_new_tokens=n) for p in PROMPTS for n in (3, 7)]
    reqs.append(GenerateRequest("the cat sat on", max_new_tokens=12, stop=("minus",)))
    batched = backend.generate(reqs)
    monkeypatch.setattr(backend, "batch_size", 1)
    assert backend.generate(reqs) == batched
    # And one request per call, which also rules out any cross-request state.
    assert [backend.generate([r])[0] for r in reqs] == batched


def test_generate_is_deterministic(backend):
    reqs = [GenerateRequest(p, max_new_tokens=6) for p in PROMPTS]
    assert backend.generate(reqs) == backend.generate(reqs) == backend.generate(list(reversed(reqs)))[::-1]


def test_generate_cuts_at_first_stop_string_and_stops_early(backend):
    prompt = PROMPTS[2]
    full = backend.generate([GenerateRequest(prompt, max_new_tokens=16)])[0]
    words = full.split()
    assert len(words) >= 3, full
    # A stop string from the middle of the text: cut just before its first occurrence, excluded.
    stop = next(w for w in words[1:] if full.index(w) > 0)
    expected = full[: full.index(stop)]
    forward_calls = []
    hook = backend.model.register_forward_hook(lambda *args: forward_calls.append(1))
    try:
        got = backend.generate([GenerateRequest(prompt, max_new_tokens=16, stop=(stop,))])[0]
    finally:
        hook.remove()
    assert got == expected and stop not in got
    assert len(forward_calls) < 16  # decoding ended when the stop string appeared, not at the budget
    # Several stop strings: the earliest occurrence wins, whatever their order in the tuple.
    first, later = words[0], words[-1]
    both = backend.generate([GenerateRequest(prompt, max_new_tokens=16, stop=(later, first))])[0]
    assert both == full[: min(full.index(first), full.index(later))]
    # A stop string that never occurs changes nothing.
    assert backend.generate([GenerateRequest(prompt, max_new_tokens=16, stop=("zebra",))])[0] == full


def test_generate_rejects_bad_budgets(backend):
    with pytest.raises(ValueError, match="max_new_tokens"):
        backend.generate([GenerateRequest("the cat", max_new_tokens=0)])
    with pytest.raises(ValueError, match="max_length"):
        backend.generate([GenerateRequest("the cat", max_new_tokens=128)])


# -- loglikelihood ----------------------------------------------------------------------------------------

LL_REQUESTS = [
    LoglikelihoodRequest(c, x)
    for c in PROMPTS + ["", "the cat sat on "]
    for x in ("mat", "the cat", "no yes no two")
]


def test_loglikelihood_batched_equals_unbatched(backend, monkeypatch):
    batched = backend.loglikelihood(LL_REQUESTS)
    monkeypatch.setattr(backend, "batch_size", 1)
    single = backend.loglikelihood(LL_REQUESTS)
    assert len(batched) == len(single) == len(LL_REQUESTS)
    for got, want in zip(batched, single, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert (got.num_tokens, got.is_greedy) == (want.num_tokens, want.is_greedy)
        assert got.logprob < 0


def test_loglikelihood_matches_manual_computation(backend):
    context, continuation = "a big red dog ran to the", "mat and the cat"
    got = backend.loglikelihood([LoglikelihoodRequest(context, continuation)])[0]
    want, n = manual_loglikelihood(backend, context, continuation)
    assert got.num_tokens == n == 4
    assert got.logprob == pytest.approx(want, abs=1e-5)
    # Trailing whitespace of the context moves to the continuation: the same tokens are scored.
    moved = backend.loglikelihood([LoglikelihoodRequest(context + " ", continuation)])[0]
    assert moved.logprob == pytest.approx(got.logprob, abs=1e-5)


def test_trailing_context_whitespace_moves_to_the_continuation(backend, monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, **kwargs):
            seen.append((text, kwargs.get("add_special_tokens", True)))
            return self.tok(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    monkeypatch.setattr(backend.encoder, "tokenizer", Recorder(backend.tokenizer))
    backend.loglikelihood([LoglikelihoodRequest("the cat sat on  ", "mat")])
    # The context gets the tokenizer's special tokens, the continuation none; they are encoded apart.
    assert seen == [("the cat sat on", True), ("  mat", False)]


def test_long_context_is_truncated_on_the_left(models):
    be = fresh(models["a"], max_length=6)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    got = be.loglikelihood([LoglikelihoodRequest(" ".join(words), "nine ten")])[0]
    # The model sees at most 6 tokens: the last 5 of the context and the first continuation token.
    want, n = manual_loglikelihood(be, " ".join(words[-5:]), "nine ten")
    assert (got.num_tokens, n) == (2, 2)
    assert got.logprob == pytest.approx(want, abs=1e-5)
    assert be.generate([GenerateRequest(" ".join(words), max_new_tokens=2)]) == be.generate(
        [GenerateRequest(" ".join(words[-4:]), max_new_tokens=2)]
    )


def test_loglikelihood_empty_context_and_continuation(backend):
    empty_ctx, empty_cont = backend.loglikelihood(
        [LoglikelihoodRequest("", "the cat"), LoglikelihoodRequest("the cat", "")]
    )
    # An empty context is scored after a start token (BOS here), so every continuation token has a predictor.
    with torch.no_grad():
        logits = backend.model(torch.tensor([[backend.tokenizer.bos_token_id, 4, 5]])).logits[0]
    logprobs = logits.log_softmax(-1)
    assert backend.tokenizer("the cat")["input_ids"] == [4, 5]
    assert empty_ctx.logprob == pytest.approx((logprobs[0, 4] + logprobs[1, 5]).item(), abs=1e-5)
    assert (empty_cont.logprob, empty_cont.num_tokens, empty_cont.is_greedy) == (0.0, 0, True)


def test_is_greedy_matches_generate(backend):
    reqs = []
    for prompt in PROMPTS[:4]:
        greedy = backend.generate([GenerateRequest(prompt, max_new_tokens=3)])[0]
        first = greedy.split()[0]
        other = next(w for w in WORDS if w != first)
        reqs += [LoglikelihoodRequest(prompt, greedy), LoglikelihoodRequest(prompt, f"{other} {greedy}")]
    answers = backend.loglikelihood(reqs)
    assert [a.is_greedy for a in answers] == [True, False] * 4
    assert all(a.num_tokens == len(r.continuation.split()) for a, r in zip(answers, reqs, strict=True))


# -- load_weights -----------------------------------------------------------------------------------------


def test_load_weights_in_place_equals_fresh_load(models):
    from safetensors.torch import load_file

    gen = [GenerateRequest(p, max_new_tokens=6) for p in PROMPTS]
    be = fresh(models["a"])
    model, before = be.model, be.loglikelihood(LL_REQUESTS)
    ref = fresh(models["b"])
    want_text, want_ll = ref.generate(gen), ref.loglikelihood(LL_REQUESTS)
    # The two checkpoints really differ, so equality below is not vacuous.
    assert max(abs(x.logprob - y.logprob) for x, y in zip(before, want_ll, strict=True)) > 1e-2

    be.load_weights(load_file(str(models["b"] / "model.safetensors")))

    assert be.model is model
    assert be.generate(gen) == want_text
    for got, want in zip(be.loglikelihood(LL_REQUESTS), want_ll, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert (got.num_tokens, got.is_greedy) == (want.num_tokens, want.is_greedy)


def test_load_weights_partial_and_cast(models):
    be = fresh(models["a"])
    state = be.model.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    new = torch.randn(state[name].shape, dtype=torch.float64)
    param = be.model.get_parameter(name)
    be.load_weights({name: new})
    assert be.model.get_parameter(name) is param and param.dtype == torch.float32
    assert torch.equal(param, new.float())
    after = be.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items() if k != name)


def test_load_weights_rejects_bad_names_and_shapes_atomically(models):
    be = fresh(models["a"])
    state = {k: v.clone() for k, v in be.model.state_dict().items()}
    good = {"model.norm.weight": torch.zeros(32)}
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        be.load_weights({**good, "model.layers.9.mlp.up_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*\(3, 32\)"):
        be.load_weights({**good, "model.embed_tokens.weight": torch.zeros(3, 32)})
    # Nothing was copied: validation runs before the first write.
    assert all(torch.equal(be.model.state_dict()[k], v) for k, v in state.items())


def test_load_weights_tied_embeddings_accept_either_name(models):
    be = fresh(models["tied"])
    emb = be.model.get_input_embeddings().weight
    assert be.model.get_output_embeddings().weight is emb
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        new = torch.randn(emb.shape)
        be.load_weights({name: new})
        assert torch.equal(be.model.get_output_embeddings().weight, new) and torch.equal(emb, new)
    same = torch.randn(emb.shape)
    be.load_weights({"lm_head.weight": same, "model.embed_tokens.weight": same.clone()})
    with pytest.raises(ValueError, match="lm_head.weight"):
        be.load_weights({"model.embed_tokens.weight": same, "lm_head.weight": same + 1})
