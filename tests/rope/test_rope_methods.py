"""Each RoPE method, applied through the seam, computes the frequencies its paper defines."""

import json
import math

import pytest
import torch

import longkit
from longkit.errors import MethodError
from longkit.models.introspect import rotary_modules, trained_length

BASE, HEAD_DIM = 10000.0, 16


def default_inv_freq():
    return 1.0 / (BASE ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))


def rotary_cos(model, length):
    """cos of the model's rotary module for positions 0..length-1: (length, HEAD_DIM)."""
    rot = model.model.rotary_emb
    x = torch.zeros(1, length, HEAD_DIM)
    cos, _ = rot(x, torch.arange(length)[None])
    return cos[0]


def test_tiny_model_facts(tiny_llama):
    assert trained_length(tiny_llama.model) == 512
    assert len(rotary_modules(tiny_llama.model)) == 1
    torch.testing.assert_close(tiny_llama.model.model.rotary_emb.inv_freq, default_inv_freq())


def test_linear_divides_every_frequency_by_factor(tiny_llama):
    with longkit.apply(tiny_llama.model, rope="linear", rope_args={"factor": 4}):
        rot = tiny_llama.model.model.rotary_emb
        torch.testing.assert_close(rot.inv_freq, default_inv_freq() / 4, rtol=1e-6, atol=0)
        assert rot.attention_scaling == 1.0


def test_yarn_keeps_high_frequencies_interpolates_low_and_scales_attention(tiny_llama):
    factor = 4.0
    with longkit.apply(tiny_llama.model, rope="yarn", rope_args={"factor": factor, "original_max_position_embeddings": 64}):
        rot = tiny_llama.model.model.rotary_emb
        inv = rot.inv_freq
        ref = default_inv_freq()
        assert torch.all(inv <= ref * (1 + 1e-6)) and torch.all(inv >= ref / factor * (1 - 1e-6))
        # Highest frequency completes >> beta_fast rotations in 64 tokens: extrapolated, i.e. untouched.
        torch.testing.assert_close(inv[0], ref[0])
        # Lowest frequency completes < beta_slow rotations: fully interpolated.
        torch.testing.assert_close(inv[-1], ref[-1] / factor)
        assert rot.attention_scaling == pytest.approx(0.1 * math.log(factor) + 1.0)
        # cos/sin carry the temperature: cos(0) = attention_scaling
        torch.testing.assert_close(rotary_cos(tiny_llama.model, 3)[0], torch.full((HEAD_DIM,), rot.attention_scaling))


@pytest.mark.parametrize("beta_fast,beta_slow,L", [(32.0, 1.0, 64), (8.0, 0.5, 256), (32.0, 1.0, 4096)])
def test_yarn_matches_the_reference_ramp(tiny_llama, beta_fast, beta_slow, L):
    # The YaRN reference code: the ramp runs over dimension indices between the dimensions that complete
    # beta_fast and beta_slow rotations over the trained length L (floored/ceiled when truncate=True).
    factor, d = 4.0, HEAD_DIM

    def dim_of(rotations):
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(BASE))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    ref = default_inv_freq()
    expected = ref / factor * ramp + ref * (1 - ramp)
    args = {"factor": factor, "beta_fast": beta_fast, "beta_slow": beta_slow, "original_max_position_embeddings": L}
    with longkit.apply(tiny_llama.model, rope="yarn", rope_args=args):
        torch.testing.assert_close(tiny_llama.model.model.rotary_emb.inv_freq, expected, rtol=1e-6, atol=0)


def test_llama3_bands(tiny_llama):
    L, factor, lo, hi = 64, 8.0, 1.0, 4.0
    with longkit.apply(tiny_llama.model, rope="llama3", rope_args={"factor": factor, "original_max_position_embeddings": L}):
        inv = tiny_llama.model.model.rotary_emb.inv_freq
    ref = default_inv_freq()
    wavelen = 2 * math.pi / ref
    high = wavelen < L / hi
    low = wavelen > L / lo
    assert high.any() and low.any()
    torch.testing.assert_close(inv[high], ref[high])
    torch.testing.assert_close(inv[low], ref[low] / factor)
    mid = ~high & ~low
    smooth = (L / wavelen[mid] - lo) / (hi - lo)
    torch.testing.assert_close(inv[mid], (1 - smooth) * ref[mid] / factor + smooth * ref[mid])


def test_dynamic_ntk_is_untouched_inside_the_window_and_grows_the_base_beyond(tiny_llama):
    L, factor = 32, 2.0
    model = tiny_llama.model
    short_ref = rotary_cos(model, 20)
    with longkit.apply(model, rope="dynamic", rope_args={"factor": factor, "original_max_position_embeddings": L}):
        torch.testing.assert_close(rotary_cos(model, 20), short_ref)
        T = 100
        cos = rotary_cos(model, T)
    d = HEAD_DIM
    base = BASE * ((factor * T / L) - (factor - 1)) ** (d / (d - 2))
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    pos = torch.arange(T, dtype=torch.float)[:, None] * inv[None]
    torch.testing.assert_close(cos, torch.cat([pos, pos], -1).cos(), rtol=1e-5, atol=1e-5)


def test_longrope_short_and_long_factors_and_attention_factor(tiny_llama, tmp_path):
    L = 16
    short = [1.0 + 0.1 * i for i in range(8)]
    long = [1.0 + i for i in range(8)]
    cfg = tmp_path / "rope.json"
    cfg.write_text(json.dumps({"rope_parameters": {"rope_type": "longrope", "short_factor": short, "long_factor": long}}))
    model = tiny_llama.model
    with longkit.apply(model, rope="longrope", rope_args={"config": str(cfg), "factor": 4.0,
                                                          "original_max_position_embeddings": L}):
        rot = model.model.rotary_emb
        assert rot.attention_scaling == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(L)))
        scale = rot.attention_scaling
        for T, factors in ((L, short), (3 * L, long)):
            inv = default_inv_freq() / torch.tensor(factors)
            pos = torch.arange(T, dtype=torch.float)[:, None] * inv[None]
            torch.testing.assert_close(rotary_cos(model, T), torch.cat([pos, pos], -1).cos() * scale, rtol=1e-5, atol=1e-5)


def test_longrope_checks_factor_count_and_file(tiny_llama):
    with pytest.raises(MethodError, match=r"'short_factor' needs 8 values \(rotary dim / 2\), got 3"):
        longkit.apply(tiny_llama.model, rope="longrope", rope_args={"short_factor": [1, 1, 1], "long_factor": [1] * 8})
    with pytest.raises(MethodError, match="'config' names no file"):
        longkit.apply(tiny_llama.model, rope="longrope:config=/nonexistent.json")


def test_rope_methods_work_on_every_tiny_family(any_tiny):
    with longkit.apply(any_tiny.model, rope="yarn:factor=4"):
        rot = rotary_modules(any_tiny.model)[0][2]
        assert rot.rope_type == "yarn"
    assert rotary_modules(any_tiny.model)[0][2].rope_type == "default"
