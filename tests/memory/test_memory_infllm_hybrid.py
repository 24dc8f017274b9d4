"""InfLLM on a model whose layers differ (tiny-gemma3: three sliding-window layers, window 16, then one
full-attention layer, RoPE base 1e4 sliding / 1e6 full; and the same configuration with the layer types
alternating, so a sliding layer follows a full one): the block memory runs on the full-attention layers exactly as on
a Llama model (checked against the paper's transcription with the full layers' own frequencies), the sliding layers
keep their window at true positions, a context inside the local window is plain attention on every layer type, and
the working set stays bounded by the configuration as the context grows."""

from __future__ import annotations

import pytest
import torch

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.memory.infllm import InfLLM, InfLLMState
from longkit.memory.naive import infllm_naive, rope

# Retrieval active on a ~72-token context: (72 - 2 - 16) / 4 = 13 blocks, top 2 per 8-query chunk.
RETRIEVING = {"block_size": 4, "n_init": 2, "n_local": 16, "topk": 2, "repr_topk": 2, "exec_chunk": 8}
WINDOW = 16  # tiny-gemma3's sliding window


def _build(layer_types: list[str] | None = None, seed: int = 0):
    """tiny-gemma3, or its configuration with other layer types (weights from a fixed seed)."""
    if layer_types is None:
        return longkit.load_model("tiny-gemma3").model
    from transformers import AutoModelForCausalLM

    from longkit.models.tiny import TINY_CONFIGS

    config = TINY_CONFIGS["tiny-gemma3"]()
    config.layer_types = layer_types
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="module")
def gemma():
    return _build()


@pytest.fixture(scope="module")
def alternating():
    return _build(["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


def _ids(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, n), generator=g)


class Capture:
    """Per layer, across forwards: the attention's unrotated q (B, H, T, D) and k (B, H_kv, T, D) (q_norm / k_norm
    outputs, before RoPE), v (B, H_kv, T, D) and its output (B, H, T, D) (o_proj's input)."""

    def __init__(self, model):
        self.parts: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.handles = []
        cfg = model.config
        self.H, self.H_kv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            self.handles += [
                a.q_norm.register_forward_hook(lambda m, args, out, i=i: self._put(i, "q", out)),
                a.k_norm.register_forward_hook(lambda m, args, out, i=i: self._put(i, "k", out)),
                a.v_proj.register_forward_hook(lambda m, args, out, i=i: self._put(i, "v", self._heads(out, self.H_kv))),
                a.o_proj.register_forward_pre_hook(lambda m, args, i=i: self._put(i, "o", self._heads(args[0], self.H))),
            ]

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        # (B, T, heads * D) -> (B, heads, T, D)
        B, T, _ = x.shape
        return x.reshape(B, T, heads, self.D).transpose(1, 2)

    def _put(self, layer: int, what: str, x: torch.Tensor) -> None:
        self.parts.setdefault((layer, what), []).append(x.detach().clone())

    def get(self, layer: int, what: str) -> torch.Tensor:
        return torch.cat(self.parts[(layer, what)], dim=2)[0].double()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _window_attention(q, k, v, inv_freq, scaling, window):
    """The reference of a sliding layer: q (H, N, D), k, v (H, N, D) unrotated, token i at position i; key j is
    visible to query i iff 0 <= i - j < window. Float64."""
    N = q.shape[1]
    pos = torch.arange(N)
    logits = rope(q, pos, inv_freq) @ rope(k, pos, inv_freq).transpose(-1, -2) * scaling
    dist = pos[:, None] - pos[None, :]
    logits = logits.masked_fill(~((dist >= 0) & (dist < window)), float("-inf"))
    return torch.softmax(logits, dim=-1) @ v.double()


def _run(model, args, ids, chunks, decode=0):
    """InfLLM applied with ``args``; ``ids`` prefilled in ``chunks`` through its cache, then ``decode`` more tokens
    one at a time. Returns (logits over all tokens, cache, capture)."""
    cap = Capture(model)
    try:
        with torch.inference_mode(), longkit.apply(model, memory="infllm", memory_args=args) as applied:
            cache = applied.new_cache()
            logits, start = [], 0
            for n in chunks:
                logits.append(model(ids[:, start : start + n], cache=cache, use_cache=True).logits)
                start += n
            for i in range(start, start + decode):
                logits.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
    finally:
        cap.remove()
    return torch.cat(logits, 1), cache, cap


def _rotary(model):
    return model.model.rotary_emb


# ---- (1) a context inside the local window: InfLLM is the model's own attention, on each layer type ----


@pytest.mark.parametrize("which", ["gemma", "alternating"])
def test_a_context_inside_the_local_window_is_the_plain_model(which, request):
    model = request.getfixturevalue(which)
    ids = _ids(model, 40)
    # n_local = 40: the oldest key of the last query is at distance 39, still local; the sliding layers' window (16)
    # is shorter than the context, so they must keep it.
    args = {"n_local": 40, "n_init": 4, "exec_chunk": 8, "block_size": 8}
    with torch.inference_mode():
        base = model(ids).logits
        with longkit.apply(model, memory="infllm", memory_args=args):
            one = model(ids).logits
    torch.testing.assert_close(one, base, rtol=1e-4, atol=1e-5)
    cached, cache, _ = _run(model, args, ids, chunks=[24, 8], decode=8)
    torch.testing.assert_close(cached, base, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 40
    assert len(cache.states()) == model.config.layer_types.count("full_attention")
    assert all(s.n_blocks() == 0 and s.init_k is None for s in cache.states())


# ---- (2) the full-attention layers: the paper's block memory with their own RoPE frequencies ----


def test_full_layer_is_the_papers_block_memory_with_its_own_frequencies(gemma):
    model = gemma
    ids = _ids(model, 72, seed=3)
    _, cache, cap = _run(model, RETRIEVING, ids, chunks=[40, 32])
    full = model.config.layer_types.index("full_attention")
    attn = model.model.layers[full].self_attn
    inv_freq = _rotary(model).full_attention_inv_freq
    assert not torch.equal(inv_freq, _rotary(model).sliding_attention_inv_freq)
    q, k, v = cap.get(full, "q"), cap.get(full, "k"), cap.get(full, "v")
    g = q.shape[0] // k.shape[0]
    ref, chosen = infllm_naive(q, k.repeat_interleave(g, 0), v.repeat_interleave(g, 0), inv_freq, scaling=attn.scaling,
                               **RETRIEVING)
    (state,) = cache.states()
    got = [s[0].tolist() for s in state.selections]
    assert got == chosen
    assert any(len(c) == 2 and c != [0, 1] for c in chosen), "retrieval was never exercised"
    torch.testing.assert_close(cap.get(full, "o"), ref, rtol=1e-4, atol=1e-4)
    # The Llama path's own state machine on the same rotated inputs: the same blocks, the same output.
    pos = torch.arange(ids.shape[1])
    direct = InfLLMState(InfLLM(**RETRIEVING))
    out = direct.forward(rope(q, pos, inv_freq).float()[None], rope(k, pos, inv_freq).float()[None], v.float()[None],
                         pos, attn.scaling, inv_freq)
    assert [s[0].tolist() for s in direct.selections] == got
    torch.testing.assert_close(out[0].double(), cap.get(full, "o"), rtol=1e-4, atol=1e-5)


def test_a_rope_method_on_the_full_layers_moves_the_far_position_too(gemma):
    # NTK on the full-attention layers only (the default for per-layer-type RoPE): InfLLM reads the scaled
    # frequencies when the layer runs, so the far position uses the frequencies the model rotated with.
    model = gemma
    ids = _ids(model, 48, seed=4)
    args = {**RETRIEVING, "n_local": 24, "exec_chunk": 8}
    cap = Capture(model)
    try:
        with torch.inference_mode(), longkit.apply(model, rope="ntk", rope_args={"factor": 64.0}, memory="infllm",
                                                   memory_args=args):
            inv_freq = _rotary(model).full_attention_inv_freq.clone()
            model(ids)
    finally:
        cap.remove()
    assert not torch.equal(inv_freq, _rotary(model).full_attention_inv_freq)
    full = model.config.layer_types.index("full_attention")
    q, k, v = cap.get(full, "q"), cap.get(full, "k"), cap.get(full, "v")
    g = q.shape[0] // k.shape[0]
    ref, _ = infllm_naive(q, k.repeat_interleave(g, 0), v.repeat_interleave(g, 0), inv_freq,
                          scaling=model.model.layers[full].self_attn.scaling, **args)
    torch.testing.assert_close(cap.get(full, "o"), ref, rtol=1e-4, atol=1e-4)


# ---- (3) the sliding-window layers: their window, at true positions, with their own frequencies ----


@pytest.mark.parametrize("which", ["gemma", "alternating"])
def test_sliding_layers_see_their_window_only(which, request):
    model = request.getfixturevalue(which)
    ids = _ids(model, 80, seed=5)
    # Retrieval on the full layers; chunked prefill and decoding, so the sliding caches roll between forwards.
    _, cache, cap = _run(model, RETRIEVING, ids, chunks=[40, 24], decode=16)
    rotary = _rotary(model)
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    for i in sliding:
        attn = model.model.layers[i].self_attn
        q, k, v, out = cap.get(i, "q"), cap.get(i, "k"), cap.get(i, "v"), cap.get(i, "o")
        g = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        ref = _window_attention(q, k, v, rotary.sliding_attention_inv_freq, attn.scaling, WINDOW)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        # a layer that saw beyond its window (full causal attention) would differ
        wide = _window_attention(q, k, v, rotary.sliding_attention_inv_freq, attn.scaling, 10**6)
        assert not torch.allclose(out, wide, atol=1e-3)
    # their caches hold the last window - 1 tokens, as transformers' own sliding layers
    assert len(cache.window_layers()) == len(sliding)
    assert all(w.keys.shape[2] == WINDOW - 1 for w in cache.window_layers())
    assert cache.get_seq_length() == 80


# ---- (4) the working set: bounded by the configuration, whatever the context length ----


def test_working_set_is_bounded_as_the_context_grows(gemma):
    model = gemma
    cfg = InfLLM(**RETRIEVING)
    c = model.config
    n_full, n_sliding = c.layer_types.count("full_attention"), c.layer_types.count("sliding_attention")
    elt = 4  # float32
    # Between forwards a full layer holds its initial tokens and at most n_local + block_size - 1 recent ones (keys
    # and values, plus a float32 score per query head); a sliding layer its last window - 1 tokens.
    recent_max = cfg.n_local + cfg.block_size - 1
    bound = n_full * (
        (cfg.n_init + recent_max) * c.num_key_value_heads * c.head_dim * 2 * elt + recent_max * c.num_attention_heads * 4
    ) + n_sliding * (WINDOW - 1) * c.num_key_value_heads * c.head_dim * 2 * elt
    seen = {}
    for n in (64, 128, 256):
        ids = _ids(model, n, seed=6)
        _, cache, _ = _run(model, RETRIEVING, ids, chunks=[32] * (n // 32), decode=0)
        (state,) = cache.states()
        assert cache.working_set_nbytes() <= bound
        assert state.max_keys_per_query <= cfg.keys_per_query_bound()
        assert state.n_blocks() == (n - cfg.n_init - cfg.n_local) // cfg.block_size
        assert all(b.device.type == "cpu" for b in state.block_k)
        # nbytes counts everything exactly: the working set, the offloaded blocks and the representative keys
        blocks = sum(t.numel() * t.element_size() for t in (*state.block_k, *state.block_v))
        assert cache.nbytes() == cache.working_set_nbytes() + blocks + state.repr.numel() * state.repr.element_size()
        seen[n] = (cache.working_set_nbytes(), state.max_keys_per_query, cache.nbytes())
    # flat in the context length once past the window (n a multiple of block_size: the same recent count)
    assert seen[128][:2] == seen[256][:2]
    # what grows is the offloaded memory
    assert seen[64][2] < seen[128][2] < seen[256][2]


# ---- bad input: layer kinds InfLLM cannot hold ----


def test_a_model_without_full_attention_layers_is_refused():
    model = _build(["sliding_attention"] * 4)
    before = model(_ids(model, 20)).logits
    with pytest.raises(MethodError, match="no full-attention layer"), longkit.apply(model, memory="infllm"):
        pass
    torch.testing.assert_close(model(_ids(model, 20)).logits, before, rtol=0, atol=0)


def test_the_sliding_layers_keep_the_models_attention_with_sample_ids():
    # The conformance prompt (sample_ids) through the eval-style path: one forward, then the same tokens through the
    # cache: equal, and the sliding layers' outputs are the plain model's (layers before the full one).
    lm = longkit.load_model("tiny-gemma3")
    ids = sample_ids(lm, n=97)
    outs_plain, outs_infllm = {}, {}

    def hook(store):
        return [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(i, o[0].clone()))
                for i, layer in enumerate(lm.model.model.layers)]

    with torch.inference_mode():
        hs = hook(outs_plain)
        lm.model(ids)
        for h in hs:
            h.remove()
        with longkit.apply(lm.model, memory="infllm", memory_args=RETRIEVING):
            hs = hook(outs_infllm)
            lm.model(ids)
            for h in hs:
                h.remove()
    types = lm.model.config.layer_types
    for i, t in enumerate(types):
        if t == "sliding_attention":
            assert torch.equal(outs_plain[i], outs_infllm[i])
        else:
            assert not torch.allclose(outs_plain[i], outs_infllm[i], atol=1e-3)
