"""RoPE methods on a model with per-layer-type rope parameters (Gemma 3): which types are scaled, parity with
transformers' own per-type initialisation, frequencies_from_config per layer type, bad input."""

import copy

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

import longkit
from conformance import CASES
from longkit.errors import MethodError
from longkit.models.introspect import per_layer_rope, rotary_modules, trained_length
from longkit.rope import frequencies_from_config
from longkit.rope.base import require_rope

TYPES = ("sliding_attention", "full_attention")
BASES = {"sliding_attention": 10000.0, "full_attention": 1000000.0}  # tiny-gemma3's, as Gemma 3's


@pytest.fixture(scope="module")
def gemma():
    return longkit.load_model("tiny-gemma3")


def buffers(module, layer_type):
    return getattr(module, f"{layer_type}_inv_freq"), getattr(module, f"{layer_type}_attention_scaling")


def transformers_module(config, scaled, layer_types):
    """transformers' own Gemma 3 rotary module for ``config`` with ``scaled`` (a flat rope dict, less rope_theta)
    given to ``layer_types``: the reference the swapped-in module must equal."""
    cfg = copy.deepcopy(config)
    rope = {t: dict(p) for t, p in config.rope_parameters.items()}
    for t in layer_types:
        rope[t] = {**scaled, "rope_theta": scaled.get("rope_theta", BASES[t])}
    cfg.rope_parameters = rope
    if scaled.get("factor") and scaled.get("original_max_position_embeddings"):
        cfg.max_position_embeddings = int(scaled["factor"] * scaled["original_max_position_embeddings"])
    return Gemma3RotaryEmbedding(cfg)


def test_tiny_gemma3_has_per_layer_type_rope(gemma):
    config = gemma.model.config
    assert per_layer_rope(config) == {t: {"rope_type": "default", "rope_theta": BASES[t]} for t in TYPES}
    assert [attr for _, attr, _ in rotary_modules(gemma.model, per_layer_type=True)] == ["rotary_emb"]
    # The single-inv_freq view (what attention remaps read) does not include Gemma 3's module.
    assert rotary_modules(gemma.model) == []
    assert trained_length(gemma.model) == 512


SCALED = [
    ("linear", {"factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
      "beta_slow": 1.0, "truncate": True}),
    ("llama3", {"factor": 8.0, "original_max_position_embeddings": 64},
     {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}),
    ("abf", {"rope_theta": 5e6}, {"rope_type": "default", "rope_theta": 5e6}),
    ("longrope", {"short_factor": [2.0] * 8, "long_factor": [4.0] * 8, "original_max_position_embeddings": 128},
     {"rope_type": "longrope", "short_factor": [2.0] * 8, "long_factor": [4.0] * 8,
      "original_max_position_embeddings": 128}),
]


@pytest.mark.parametrize("name,args,expected", SCALED, ids=[s[0] for s in SCALED])
@pytest.mark.parametrize("layer_types", [None, "sliding_attention", "all"])
def test_scales_the_chosen_layer_types_as_transformers_builds_them(gemma, name, args, expected, layer_types):
    model = gemma.model
    original = model.model.rotary_emb
    chosen = {None: ["full_attention"], "sliding_attention": ["sliding_attention"], "all": list(TYPES)}[layer_types]
    extra = {} if layer_types is None else {"layer_types": layer_types}
    with longkit.apply(model, rope=name, rope_args={**args, **extra}):
        new = model.model.rotary_emb
        assert new is not original
        reference = transformers_module(model.config, expected, chosen)
        for t in TYPES:
            inv, scale = buffers(new, t)
            ref_inv, ref_scale = buffers(reference, t)
            assert torch.equal(inv, ref_inv) and scale == ref_scale, t
            # longkit's own frequency function reads the swapped-in config per layer type, bit for bit.
            ours, att = frequencies_from_config(new.config, layer_type=t)
            assert torch.equal(ours, inv) and att == pytest.approx(scale, rel=1e-12)
            unchanged = torch.equal(inv, buffers(original, t)[0])
            if name == "abf" and t == "sliding_attention" and t in chosen:
                assert not unchanged
            assert unchanged == (t not in chosen), f"{t}: scaled={not unchanged}, chosen={chosen}"
        assert model.config.rope_parameters == {t: {"rope_type": "default", "rope_theta": BASES[t]} for t in TYPES}
    assert model.model.rotary_emb is original


def test_ntk_raises_each_chosen_types_own_base(gemma):
    model = gemma.model
    with longkit.apply(model, rope="ntk:factor=4,layer_types=all"):
        rope = model.model.rotary_emb.config.rope_parameters
    d = 16  # tiny-gemma3's head dim
    for t in TYPES:
        assert rope[t]["rope_type"] == "default"
        assert rope[t]["rope_theta"] == pytest.approx(BASES[t] * 4.0 ** (d / (d - 2)), rel=1e-12)


def test_dynamic_grows_the_full_layers_base_past_the_trained_length_only(gemma):
    model = gemma.model
    original = model.model.rotary_emb
    ids = torch.randint(0, 256, (1, 97), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), longkit.apply(model, rope="dynamic:factor=2,original_max_position_embeddings=32"):
        rot = model.model.rotary_emb
        assert torch.equal(buffers(rot, "full_attention")[0], buffers(original, "full_attention")[0])
        model(ids)
        grown = buffers(rot, "full_attention")[0]
        expected, _ = frequencies_from_config(rot.config, seq_len=97, layer_type="full_attention")
        assert torch.equal(grown, expected)
        assert not torch.equal(grown, buffers(original, "full_attention")[0])
        assert torch.equal(buffers(rot, "sliding_attention")[0], buffers(original, "sliding_attention")[0])


def test_longrope_start_tokens_keep_the_original_cos_sin_per_layer_type(gemma):
    model = gemma.model
    original = model.model.rotary_emb
    spec = {"short_factor": [2.0] * 8, "long_factor": [4.0] * 8, "start_tokens": 4}
    x = torch.zeros(1, 10, 64)
    pos = torch.arange(10)[None]
    with torch.inference_mode(), longkit.apply(model, rope="longrope", rope_args=spec):
        rot = model.model.rotary_emb
        for t in TYPES:
            cos, sin = rot(x, pos, t)
            cos0, sin0 = original(x, pos, t)
            assert torch.equal(cos[:, :4], cos0[:, :4]) and torch.equal(sin[:, :4], sin0[:, :4])
            # Past the start tokens only the scaled type (full attention) differs from the original.
            assert torch.equal(cos[:, 4:], cos0[:, 4:]) == (t == "sliding_attention")


def test_cached_decoding_matches_a_full_forward_past_the_sliding_window(gemma):
    model = gemma.model
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), longkit.apply(model, rope="yarn:factor=4") as applied:
        full = model(ids).logits[:, -5:]
        cache = applied.new_cache()
        model(ids[:, :-5], cache=cache, use_cache=True)
        steps = [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(55, 60)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_every_rope_method_of_the_matrix_applies_to_the_full_layers(gemma):
    for (kind, name), case in CASES.items():
        if kind != "rope":
            continue
        with longkit.apply(gemma.model, rope=name, rope_args=case["args"][0]):
            rope = gemma.model.model.rotary_emb.config.rope_parameters
            assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}, name


# ---- bad input ----


@pytest.mark.parametrize("value", ["global_attention", "full_attention;chunked_attention"])
def test_a_layer_type_the_model_lacks_is_refused(gemma, value):
    with pytest.raises(MethodError, match=r"parameter 'layer_types'.*does not have.*sliding_attention, full_attention"):
        longkit.apply(gemma.model, rope="yarn", rope_args={"factor": 2.0, "layer_types": value})
    assert rotary_modules(gemma.model, per_layer_type=True)[0][2] is gemma.model.model.rotary_emb


def test_layer_types_on_a_model_with_one_rope_dict_is_refused(tiny_llama):
    with pytest.raises(MethodError, match=r"parameter 'layer_types' applies only to models with per-layer-type"):
        longkit.apply(tiny_llama.model, rope="linear:factor=2,layer_types=full_attention")


def test_empty_layer_types_is_refused():
    with pytest.raises(MethodError, match=r"parameter 'layer_types' must name at least one layer type"):
        longkit.MethodSpec.parse("rope=linear:factor=2,layer_types=;").methods()


def test_layer_types_from_python_list_and_cli_string_agree():
    from longkit.rope.linear import Linear

    assert Linear(2.0, layer_types=["sliding_attention", "full_attention"]).layer_types == (
        "sliding_attention;full_attention"
    )
    assert Linear(2.0, layer_types="all").label() == "linear:factor=2,layer_types=all"
    spec = longkit.MethodSpec.parse("rope=longrope:short_factor=[1,2],long_factor=1;3,layer_types=full_attention")
    (method,) = spec.methods()
    assert method.label() == "longrope:short_factor=[1,2],long_factor=[1,3],layer_types=full_attention"
    # The label parses back to the same method.
    assert longkit.MethodSpec.parse(f"rope={method.label()}").methods()[0] == method


def test_frequencies_from_config_needs_a_valid_layer_type_exactly_when_per_type(gemma, tiny_llama):
    with pytest.raises(MethodError, match=r"parameter 'layer_type' must be one of sliding_attention, full_attention "
                                          r"\(none given\)"):
        frequencies_from_config(gemma.model.config)
    with pytest.raises(MethodError, match=r"parameter 'layer_type' must be one of .*\(got 'global'\)"):
        frequencies_from_config(gemma.model.config, layer_type="global")
    with pytest.raises(MethodError, match=r"parameter 'layer_type' applies only to configs with per-layer-type"):
        frequencies_from_config(tiny_llama.model.config, layer_type="full_attention")


def test_frequencies_from_config_matches_transformers_default_per_type(gemma):
    reference = Gemma3RotaryEmbedding(gemma.model.config)
    for t in TYPES:
        inv, att = frequencies_from_config(gemma.model.config, layer_type=t)
        assert torch.equal(inv, buffers(reference, t)[0]) and att == 1.0


def test_a_caller_that_cannot_handle_per_layer_types_refuses_clearly(gemma):
    with pytest.raises(MethodError, match=r"per-layer-type rope parameters \(sliding_attention, full_attention\), "
                                          r"which 'longrope' cannot handle"):
        require_rope(gemma.model, "longrope")


def test_the_cli_runs_a_rope_method_on_a_per_layer_type_model(tmp_path):
    from typer.testing import CliRunner

    from longkit.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", "tiny-gemma3", "--task", "passkey", "--lengths", "300",
                                      "--samples", "1", "--no-baseline", "--rope", "dynamic:factor=2",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "has none" not in result.output
