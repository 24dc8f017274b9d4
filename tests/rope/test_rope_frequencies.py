"""The RoPE frequency registry: parity with transformers 5.x, ntk/abf properties, the seam, bad input."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

import longkit
from conformance import CASES
from longkit.errors import MethodError
from longkit.registry import REGISTRIES, params_of
from longkit.rope import FREQUENCIES, RopeParams, frequencies, frequencies_from_config, rope_params
from longkit.rope.frequencies import ModelInputs, inputs_of

HEAD_DIMS = (64, 128)
BASES = (10000.0, 500000.0)
FACTORS = (2.0, 4.0, 8.0)
L = 1024  # trained length of the parity configs


def factor_list(n, seed, low=1.0, high=4.0):
    rng = random.Random(seed)
    return sorted(rng.uniform(low, high) for _ in range(n))


def llama_config(head_dim, rope_parameters, max_position_embeddings=L):
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
                       num_hidden_layers=1, intermediate_size=8, vocab_size=8,
                       max_position_embeddings=max_position_embeddings, rope_parameters=dict(rope_parameters))


def reference(config, seq_len=None):
    """transformers' own (inv_freq, attention_factor) for the config's rope_type."""
    rope = config.rope_parameters
    if rope["rope_type"] == "default":
        # 5.x has no "default" in ROPE_INIT_FUNCTIONS; each model has its own. Llama's ignores partial rotary,
        # Phi's (like GPT-NeoX, StableLM) honours it.
        if rope.get("partial_rotary_factor", 1.0) == 1.0:
            return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        return PhiRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, seq_len=seq_len)


def assert_parity(config, seq_len=None):
    """frequencies_from_config and frequencies(**kwargs) both match transformers: inv_freq and attention factor."""
    ref_inv, ref_att = reference(config, seq_len)
    inv, att = frequencies_from_config(config, seq_len=seq_len)
    assert inv.dtype == torch.float32 and inv.shape == ref_inv.shape
    torch.testing.assert_close(inv, ref_inv, rtol=1e-6, atol=0)
    assert att == pytest.approx(ref_att, rel=1e-12)
    # The same through the keyword API, passing the config's rope_parameters straight through.
    rope = dict(config.rope_parameters)
    if rope["rope_type"] == "dynamic":
        rope.pop("original_max_position_embeddings", None)
    inv2, att2 = frequencies(rope["rope_type"], head_dim=config.head_dim, base=rope["rope_theta"], seq_len=seq_len,
                             max_position_embeddings=config.max_position_embeddings, **rope)
    assert torch.equal(inv2, inv) and att2 == att
    return inv, att


def parity_cases():
    """(id, head_dim, rope_parameters, max_position_embeddings) over head dims, bases, factors and variants."""
    for hd in HEAD_DIMS:
        half = hd // 2
        for base in BASES:
            yield f"default-{hd}-{base:g}", hd, {"rope_type": "default", "rope_theta": base}, L
            for f in FACTORS:
                tag = f"{hd}-{base:g}-{f:g}"
                yield f"linear-{tag}", hd, {"rope_type": "linear", "rope_theta": base, "factor": f}, L
                yield f"dynamic-{tag}", hd, {"rope_type": "dynamic", "rope_theta": base, "factor": f}, L
                yarn = {"rope_type": "yarn", "rope_theta": base, "factor": f, "original_max_position_embeddings": L}
                yield f"yarn-{tag}", hd, yarn, int(f * L)
                llama3 = {"rope_type": "llama3", "rope_theta": base, "factor": f, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": L}
                yield f"llama3-{tag}", hd, llama3, int(f * L)
                longrope = {"rope_type": "longrope", "rope_theta": base, "factor": f, "original_max_position_embeddings": L,
                            "short_factor": factor_list(half, 1, 1.0, 1.2), "long_factor": factor_list(half, 2)}
                yield f"longrope-{tag}", hd, longrope, int(f * L)
    # Variants of the optional parameters, at head_dim 128 and base 10000.
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096}
    yield "yarn-no-truncate", 128, {**yarn, "truncate": False}, 16384
    yield "yarn-betas", 128, {**yarn, "beta_fast": 16.0, "beta_slow": 2.0}, 16384
    yield "yarn-mscale", 128, {**yarn, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707}, 163840
    yield "yarn-mscale-equal", 128, {**yarn, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0}, 163840
    yield "yarn-attention-factor", 128, {**yarn, "attention_factor": 1.2079}, 16384
    yield "yarn-implied-factor", 128, {**yarn, "factor": None}, 32768  # transformers requires the key
    yield "yarn-short-L", 128, {**yarn, "original_max_position_embeddings": 64}, 256
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    yield "llama3-3.1", 128, llama3, 131072
    yield "llama3-bands", 64, {**llama3, "low_freq_factor": 2.0, "high_freq_factor": 3.0, "factor": 32.0}, 131072
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                "short_factor": factor_list(48, 3, 1.0, 1.1), "long_factor": factor_list(48, 4, 1.0, 40.0)}
    yield "longrope-implied-factor", 96, longrope, 131072
    yield "longrope-attention-factor", 96, {**longrope, "factor": 32.0, "attention_factor": 1.19}, 131072
    yield "longrope-factor-1", 96, {**longrope, "factor": 1.0}, 4096


PARITY = list(parity_cases())


@pytest.mark.parametrize("head_dim,rope,max_pos", [c[1:] for c in PARITY], ids=[c[0] for c in PARITY])
def test_parity_with_transformers(head_dim, rope, max_pos):
    assert_parity(llama_config(head_dim, rope, max_pos))


PARTIAL = [
    ("default", {}),
    ("linear", {"factor": 4.0}),
    ("dynamic", {"factor": 4.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": L}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": L}),
    ("longrope", {"factor": 4.0, "original_max_position_embeddings": L}),
]


@pytest.mark.parametrize("head_dim,prf", [(64, 0.5), (128, 0.5), (80, 0.4)])
@pytest.mark.parametrize("rope_type,extra", PARTIAL, ids=[p[0] for p in PARTIAL])
def test_partial_rotary_parity(rope_type, extra, head_dim, prf):
    rotary_dim = int(head_dim * prf)
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "partial_rotary_factor": prf, **extra}
    if rope_type == "longrope":
        rope.update(short_factor=factor_list(rotary_dim // 2, 5, 1.0, 1.1), long_factor=factor_list(rotary_dim // 2, 6))
    config = llama_config(head_dim, rope, 4 * L)
    for seq_len in (None, 4 * L, 8 * L):
        inv, _ = assert_parity(config, seq_len)
        assert inv.shape == (rotary_dim // 2,)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("factor", (2.0, 8.0))
def test_dynamic_parity_below_at_and_above_the_trained_length(head_dim, base, factor):
    config = llama_config(head_dim, {"rope_type": "dynamic", "rope_theta": base, "factor": factor})
    default, _ = frequencies("default", head_dim=head_dim, base=base)
    for seq_len in (None, 1, L // 2, L - 1, L):
        inv, _ = assert_parity(config, seq_len)
        assert torch.equal(inv, default), seq_len
    previous = default
    for seq_len in (L + 1, 2 * L, 10 * L):
        inv, _ = assert_parity(config, seq_len)
        # Growing lengths give a growing base: every frequency but the first slows down.
        assert torch.all(inv[1:] < previous[1:]) and inv[0] == 1.0, seq_len
        previous = inv
    # A 0-d tensor seq_len (what transformers' runtime path holds) reads the same as the int.
    assert torch.equal(frequencies_from_config(config, seq_len=torch.tensor(3 * L))[0],
                       frequencies_from_config(config, seq_len=3 * L)[0])


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_longrope_selects_short_factors_up_to_the_trained_length_and_long_beyond(head_dim):
    half = head_dim // 2
    short, long = factor_list(half, 7, 1.0, 1.2), factor_list(half, 8)
    config = llama_config(head_dim, {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 8.0,
                                     "original_max_position_embeddings": L, "short_factor": short,
                                     "long_factor": long}, 8 * L)
    default, _ = frequencies("default", head_dim=head_dim, base=10000.0)
    expected_att = math.sqrt(1 + math.log(8.0) / math.log(L))
    for seq_len, factors in ((None, short), (1, short), (L, short), (L + 1, long), (8 * L, long)):
        inv, att = assert_parity(config, seq_len)
        torch.testing.assert_close(inv, default / torch.tensor(factors), rtol=1e-6, atol=0)
        # The attention factor does not depend on which set is used.
        assert att == pytest.approx(expected_att)


def module_cos_sin(config, length):
    """cos/sin of a fresh transformers rotary module for positions 0..length-1: (length, rotary_dim) each."""
    rot = LlamaRotaryEmbedding(config)
    cos, sin = rot(torch.zeros(1, length, config.head_dim), torch.arange(length)[None])
    return cos[0], sin[0]


def our_cos_sin(inv_freq, attention_factor, length):
    # (T, d/2) angles, duplicated to (T, d) in transformers' rotate_half layout
    angles = torch.arange(length).float()[:, None] * inv_freq[None]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


E = 256  # trained length of the end-to-end configs (short, to keep the (T, D) cos/sin small)
END_TO_END = [
    ("default", {}, E),
    ("linear", {"factor": 4.0}, E),
    ("dynamic", {"factor": 4.0}, E),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": E}, 4 * E),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": E},
     8 * E),
    ("longrope", {"factor": 4.0, "original_max_position_embeddings": E, "short_factor": factor_list(32, 9, 1.0, 1.2),
                  "long_factor": factor_list(32, 10)}, 4 * E),
]


@pytest.mark.parametrize("rope_type,extra,max_pos", END_TO_END, ids=[e[0] for e in END_TO_END])
@pytest.mark.parametrize("base", BASES)
def test_cos_sin_end_to_end_match_the_rotary_module(rope_type, extra, max_pos, base):
    config = llama_config(64, {"rope_type": rope_type, "rope_theta": base, **extra}, max_pos)
    for length in (16, E, E + 1, 3 * E):
        # seq_len = the current length, as the module's forward measures it (max position + 1).
        inv, att = frequencies_from_config(config, seq_len=length)
        cos, sin = our_cos_sin(inv, att, length)
        ref_cos, ref_sin = module_cos_sin(config, length)
        # The module's dynamic path passes seq_len as a tensor, so its new base is rounded in float32, not
        # computed in Python floats as at init: inv_freq can differ by an ulp, angles by up to length * 2e-7.
        atol = max(length * 2e-7, 1e-6) if rope_type == "dynamic" else 1e-6
        assert cos.shape == ref_cos.shape == sin.shape == ref_sin.shape == (length, 64)
        # a plain max: assert_close's diagnostics cost a tenth of a second on tensors this size
        assert (cos - ref_cos).abs().max() <= atol and (sin - ref_sin).abs().max() <= atol, length


# ntk and abf: properties and equivalences


@pytest.mark.parametrize("head_dim,prf", [(64, 1.0), (128, 1.0), (128, 0.5)])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("factor", FACTORS)
def test_ntk_is_default_at_the_ntk_base(head_dim, prf, base, factor):
    d = int(head_dim * prf)
    inv, att = frequencies("ntk", head_dim=head_dim, base=base, factor=factor, partial_rotary_factor=prf)
    default, _ = frequencies("default", head_dim=head_dim, base=base, partial_rotary_factor=prf)
    at_new_base, _ = frequencies("default", head_dim=head_dim, base=base * factor ** (d / (d - 2)),
                                 partial_rotary_factor=prf)
    assert torch.equal(inv, at_new_base) and att == 1.0
    # NTK-aware: the highest frequency is kept, the lowest divided by exactly `factor`, each j by factor^(2j/(d-2)).
    assert inv[0] == default[0] == 1.0
    torch.testing.assert_close(inv[-1], default[-1] / factor, rtol=1e-5, atol=0)
    j = torch.arange(d // 2, dtype=torch.float64)
    torch.testing.assert_close(inv.double(), default.double() / factor ** (2 * j / (d - 2)), rtol=1e-5, atol=0)
    assert torch.equal(frequencies("ntk", head_dim=head_dim, base=base, factor=1.0, partial_rotary_factor=prf)[0],
                       default)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("theta", (500000.0, 1e6, 2000.0))
def test_abf_is_default_at_the_new_theta(head_dim, theta):
    inv, att = frequencies("abf", head_dim=head_dim, base=10000.0, rope_theta=theta)
    assert torch.equal(inv, frequencies("default", head_dim=head_dim, base=theta)[0]) and att == 1.0
    # Without rope_theta, the paper's 500000.
    assert torch.equal(frequencies("abf", head_dim=head_dim, base=10000.0)[0],
                       frequencies("default", head_dim=head_dim, base=500000.0)[0])


@pytest.mark.parametrize("method,args,kwargs", [
    ("ntk", {"factor": 4.0}, {"factor": 4.0}),
    ("ntk", {"factor": 16.0}, {"factor": 16.0}),
    ("abf", {"rope_theta": 500000.0}, {"rope_theta": 500000.0}),
    ("abf", {}, {}),
])
def test_ntk_and_abf_through_the_seam(tiny_llama, method, args, kwargs):
    model = tiny_llama.model
    original = model.model.rotary_emb
    expected, att = frequencies(method, head_dim=16, base=10000.0, **kwargs)
    with longkit.apply(model, rope=method, rope_args=args):
        rot = model.model.rotary_emb
        assert rot is not original and rot.rope_type == "default"
        torch.testing.assert_close(rot.inv_freq, expected, rtol=1e-6, atol=0)
        assert rot.attention_scaling == att == 1.0
    assert model.model.rotary_emb is original
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


ROPE_CASES = [(name, args) for (kind, name), case in CASES.items() if kind == "rope" for args in case["args"]]


@pytest.mark.parametrize("name,args", ROPE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ROPE_CASES)])
def test_every_seam_method_builds_what_frequencies_from_config_computes(tiny_llama, name, args):
    with longkit.apply(tiny_llama.model, rope=name, rope_args=args):
        rot = tiny_llama.model.model.rotary_emb
        inv, att = frequencies_from_config(rot.config)
        torch.testing.assert_close(rot.inv_freq, inv, rtol=1e-6, atol=0)
        assert rot.attention_scaling == pytest.approx(att, rel=1e-12)


# The registry as a whole


def universal_args(head_dim):
    """One set of keyword arguments every frequency function accepts and can compute with."""
    half = head_dim // 2
    return {"factor": 4.0, "original_max_position_embeddings": 256, "max_position_embeddings": 1024,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "short_factor": factor_list(half, 11, 1.0, 1.2), "long_factor": factor_list(half, 12)}


@pytest.mark.parametrize("name", sorted(FREQUENCIES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_registered_function_gives_finite_positive_float32_frequencies(name, head_dim):
    for seq_len in (None, 1, 256, 257, 4096):
        inv, att = frequencies(name, head_dim=head_dim, base=10000.0, seq_len=seq_len, **universal_args(head_dim))
        assert inv.shape == (head_dim // 2,) and inv.dtype == torch.float32, name
        assert torch.isfinite(inv).all() and (inv > 0).all(), name
        assert isinstance(att, float) and math.isfinite(att) and att > 0, name
        # No frequency faster than one radian per token: the highest one is base^0 = 1 or slower.
        assert inv.max() <= 1.0 + 1e-6, name
    args = {**universal_args(head_dim), "partial_rotary_factor": 0.5}
    args.update(short_factor=args["short_factor"][: head_dim // 4], long_factor=args["long_factor"][: head_dim // 4])
    assert frequencies(name, head_dim=head_dim, base=10000.0, **args)[0].shape == (head_dim // 4,)


def test_every_rope_method_of_the_seam_has_a_frequency_function():
    assert set(REGISTRIES["rope"].names()) <= set(FREQUENCIES)


def test_config_keys_pass_straight_through():
    config = llama_config(64, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": L}, 4 * L)
    inv, att = frequencies("yarn", head_dim=64, base=10000.0, **config.rope_parameters)
    ref_inv, ref_att = frequencies_from_config(config)
    assert torch.equal(inv, ref_inv) and att == ref_att


def test_rope_params_is_one_frozen_validated_object():
    p = rope_params("yarn", head_dim=80, base=10000, partial_rotary_factor=0.4, factor="4",
                    original_max_position_embeddings="8k", short_factor=[1, 2] * 8, mscale=None)
    assert isinstance(p, RopeParams)
    assert (p.rotary_dim, p.n_freq, p.factor, p.trained_length) == (32, 16, 4.0, 8192)
    assert p.short_factor == tuple([1.0, 2.0] * 8) and p.mscale is None
    assert (p.beta_fast, p.beta_slow, p.truncate) == (32.0, 1.0, True)
    with pytest.raises(AttributeError):
        p.factor = 2.0


def test_llama_partial_rotary_config_follows_the_partial_rotary_models():
    # Llama's own default rope ignores partial_rotary_factor; longkit follows Phi/GPT-NeoX/StableLM.
    config = llama_config(64, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    inv, _ = frequencies_from_config(config)
    torch.testing.assert_close(inv, PhiRotaryEmbedding.compute_default_rope_parameters(config)[0], rtol=1e-6, atol=0)
    assert inv.shape == (16,)


# Bad input: a MethodError naming the parameter and its valid range


SF = [1.0] * 32


@pytest.mark.parametrize("name,kwargs,match", [
    ("yarnn", {}, r"unknown rope frequencies 'yarnn'; valid names: abf, default, dynamic, linear, llama3, longrope, "
                  r"ntk, yarn"),
    ("linear", {"factor": 0.5}, r"rope method 'linear': parameter 'factor' must be >= 1.0 \(got 0.5\)"),
    ("linear", {}, r"rope method 'linear' needs parameter 'factor' \(>= 1.0"),
    ("ntk", {}, r"rope method 'ntk' needs parameter 'factor' \(>= 1.0"),
    ("dynamic", {"factor": 2.0}, r"needs parameter 'original_max_position_embeddings' \(the trained length, > 0\)"),
    ("yarn", {"factor": 4.0}, r"needs parameter 'original_max_position_embeddings'"),
    ("yarn", {"original_max_position_embeddings": 4096}, r"'yarn' needs parameter 'factor' \(>= 1.0"),
    ("yarn", {"factor": "big"}, r"parameter 'factor' expects float, got 'big'"),
    ("yarn", {"fctor": 2.0}, r"has no parameter 'fctor'; valid parameters: .*factor"),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1.0, "beta_slow": 32.0},
     r"parameter 'beta_fast' must be >= beta_slow"),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64, "beta_slow": 0},
     r"parameter 'beta_slow' must be > 0"),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": -1.0},
     r"parameter 'attention_factor' must be > 0"),
    ("llama3", {"factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     r"needs parameter 'low_freq_factor' \(> 0"),
    ("llama3", {"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8},
     r"parameter 'low_freq_factor' must be < high_freq_factor"),
    ("longrope", {"long_factor": SF, "original_max_position_embeddings": 4096, "factor": 4.0},
     r"needs parameter 'short_factor'"),
    ("longrope", {"short_factor": [1.0] * 3, "long_factor": SF, "original_max_position_embeddings": 4096},
     r"parameter 'short_factor' needs 32 values \(rotary_dim / 2\), got 3"),
    ("longrope", {"short_factor": SF, "long_factor": [0.0] * 32, "original_max_position_embeddings": 4096},
     r"parameter 'long_factor' values must be finite and > 0"),
    ("longrope", {"short_factor": SF, "long_factor": "1,2", "original_max_position_embeddings": 4096},
     r"parameter 'long_factor' expects a list of floats"),
    ("longrope", {"short_factor": SF, "long_factor": SF, "original_max_position_embeddings": 4096},
     r"'longrope' needs parameter 'factor'"),
    ("default", {"head_dim": 63}, r"parameter 'head_dim' must be even \(got 63\)"),
    ("default", {"head_dim": 0}, r"parameter 'head_dim' must be >= 2"),
    ("default", {"base": 1.0}, r"parameter 'base' must be > 1.0"),
    ("default", {"partial_rotary_factor": 0.0}, r"parameter 'partial_rotary_factor' must be > 0 and <= 1"),
    ("default", {"partial_rotary_factor": 0.3},
     r"parameter 'partial_rotary_factor' must make int\(head_dim \* partial_rotary_factor\) an even number >= 2 "
     r"\(got int\(64 \* 0.3\) = 19\)"),
    ("ntk", {"head_dim": 2, "factor": 2.0}, r"parameter 'head_dim' needs a rotary dim > 2"),
    ("abf", {"rope_theta": 0.5}, r"parameter 'rope_theta' must be > 1.0"),
    ("linear", {"factor": 2.0, "rope_type": "yarn"}, r"parameter 'rope_type' must be 'linear' or absent"),
    ("linear", {"factor": 2.0, "rope_theta": 500000.0}, r"parameter 'rope_theta' must equal base=10000.0"),
    ("default", {"seq_len": 0}, r"parameter 'seq_len' must be an int >= 1 or None"),
    ("dynamic", {"seq_len": 1.5, "factor": 2.0, "max_position_embeddings": 8}, r"parameter 'seq_len' must be an int"),
])
def test_bad_input_names_the_parameter_and_range(name, kwargs, match):
    kwargs = {"head_dim": 64, "base": 10000.0, **kwargs}
    with pytest.raises(MethodError, match=match):
        frequencies(name, **kwargs)


@pytest.mark.parametrize("config,match", [
    (SimpleNamespace(rope_parameters=None), r"has no rope_parameters"),
    (SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "default"},
                                      "sliding_attention": {"rope_type": "default"}}), r"per-layer-type"),
    (SimpleNamespace(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}, head_dim=64,
                     max_position_embeddings=8), r"unknown rope frequencies 'proportional'; valid names: abf"),
    (SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]},
                     head_dim=64, max_position_embeddings=8), r"has no parameter 'mrope_section'"),
])
def test_frequencies_from_config_bad_configs(config, match):
    with pytest.raises(MethodError, match=match):
        frequencies_from_config(config)


# One declaration: a rope method's frequency inputs are its dataclass parameters


MODEL_INPUTS = {"head_dim", "base", "partial_rotary_factor", "max_position_embeddings"}


def test_frequency_functions_and_rope_methods_are_the_same_set():
    assert set(FREQUENCIES) == set(REGISTRIES["rope"].names())
    assert {p.name for p in params_of(ModelInputs)} == MODEL_INPUTS


def _range(info):
    return info.type.removesuffix(" | None"), info.ge, info.gt, info.le, info.lt, info.choices


@pytest.mark.parametrize("name", sorted(FREQUENCIES))
def test_frequency_inputs_are_the_method_parameters(name):
    cls = REGISTRIES["rope"].get(name)
    inputs = inputs_of(name)
    declared = {p.name: p for p in params_of(cls)}
    assert set(cls.required) <= set(declared) and set(cls.apply_only) <= set(declared)
    for key, info in declared.items():
        if key in cls.apply_only:
            assert key not in inputs, key
            continue
        # the same range and type, and the class default unless transformers requires the key
        assert _range(inputs[key]) == _range(info), key
        assert inputs[key].default == (None if key in cls.required else info.default), key
    # A parameter declared by several rope methods has one range (no drift between yarn's and longrope's factor).
    for other in REGISTRIES["rope"].names():
        for info in params_of(REGISTRIES["rope"].get(other)):
            if info.name in declared and info.name not in cls.apply_only:
                assert _range(info) == _range(declared[info.name]), (other, info.name)


class RecordingParams(RopeParams):
    """RopeParams that records which inputs a frequency function reads."""

    def __getattribute__(self, key):
        if not key.startswith("_") and key in object.__getattribute__(self, "_inputs"):
            object.__getattribute__(self, "_read").add(key)
        return object.__getattribute__(self, key)

    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_read", set())
        super().__init__(*args, **kwargs)
        self._read.clear()


@pytest.mark.parametrize("name", sorted(FREQUENCIES))
def test_frequency_functions_read_only_the_model_and_their_method_parameters(name):
    own = {p.name for p in params_of(REGISTRIES["rope"].get(name))}
    arg_sets = [universal_args(64), {**universal_args(64), "mscale": 1.0, "mscale_all_dim": 0.5},
                {**universal_args(64), "attention_factor": 1.1}]
    read = set()
    for args in arg_sets:
        for seq_len in (None, 4096):
            p = RecordingParams(name, head_dim=64, base=10000.0, **args)
            FREQUENCIES[name](p, seq_len)
            read |= p._read
    assert read and read <= MODEL_INPUTS | own, sorted(read - MODEL_INPUTS - own)


def test_cross_parameter_rules_are_checked_once_for_both_paths():
    yarn = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1.0, "beta_slow": 32.0}
    for build in (lambda: REGISTRIES["rope"].create("yarn", yarn), lambda: frequencies("yarn", head_dim=64, base=1e4, **yarn)):
        with pytest.raises(MethodError, match=r"rope method 'yarn': parameter 'beta_fast' must be >= beta_slow"):
            build()
    # ranges agree with transformers: a longrope factor of 1 and a yarn mscale of 0 ("off") are valid on both paths
    assert REGISTRIES["rope"].create("longrope", {"factor": 1.0}).factor == 1.0
    assert REGISTRIES["rope"].create("yarn", {"mscale": 0.0, "mscale_all_dim": 0.0}).mscale == 0.0
