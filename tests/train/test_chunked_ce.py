"""Chunked cross-entropy (train/chunked_ce.py): value and gradients equal the model's own loss (transformers'
ForCausalLMLoss) on tiny-llama and tiny-gemma3 with a logit soft cap, answer-only rows, rows without a target,
num_items_in_batch, LoRA and a trained tied embedding; a train() run equals the old path's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import longkit
from longkit.errors import MethodError, TrainError
from longkit.runtime.train import TrainConfig, read_eval_log, read_log, train
from longkit.train import create_recipe
from longkit.train.chunked_ce import chunked_ce, head_of, model_chunked_ce

IGNORE = -100


def _batch(vocab=256, B=2, T=50, seed=0):
    """Two rows: the first answer-only (its last 19 targets scored), the second with a hole in its targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :31] = IGNORE
    labels[1, 10:20] = IGNORE
    return ids, labels


def _reference(logits, labels, num_items=None):
    # transformers' ForCausalLMLoss, written out: float32 logits, shifted labels, sum / num_items or mean
    flat = logits[:, :-1].float().flatten(0, 1)
    target = labels[:, 1:].flatten()
    if num_items is None:
        return F.cross_entropy(flat, target, ignore_index=IGNORE)
    return F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum") / num_items


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, expected, tol=1e-5):
    """Every gradient within ``tol`` of the tensor's largest entry (float32 sums in another order differ by
    ~1e-7 of it; entries near zero have no relative precision of their own)."""
    assert got.keys() == expected.keys() and got
    for name, g in expected.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        gap = float((got[name] - g).abs().max())
        assert gap <= tol * scale, (name, gap, scale)


@pytest.fixture(scope="module", params=[("tiny-llama", None), ("tiny-gemma3", 3.0)], ids=["llama", "gemma3-softcap"])
def model(request):
    name, softcap = request.param
    m = copy.deepcopy(longkit.load_model(name).model)
    if softcap is not None:
        # Gemma 3's final_logit_softcapping. The random head's logits stay below 1: scaled up to a few units, so
        # that the cap bends them as it bends a trained model's
        m.config.final_logit_softcapping = softcap
        with torch.no_grad():
            m.lm_head.weight.mul_(8.0)
    return m


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("num_items", [None, 57])
def test_value_and_gradients_equal_the_models_own_loss(model, chunk, num_items):
    ids, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    model.zero_grad()
    expected = model(input_ids=ids, labels=labels, use_cache=False, **kw).loss
    expected.backward()
    want = _grads(model)
    model.zero_grad()
    got = model_chunked_ce(model, {"input_ids": ids, "labels": labels}, chunk=chunk, num_items=num_items)
    got.backward()
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    _assert_same_grads(_grads(model), want)
    # the soft cap matters on this model: without it the loss differs
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap is not None:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            plain = chunked_ce(hidden, model.lm_head, labels, chunk=chunk, num_items=num_items)
        assert abs(float(plain) - float(expected)) > 0.05


def test_gradients_wrt_hidden_and_head_and_bias_against_full_logits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 40, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 97)
    labels = torch.randint(0, 97, (3, 40), generator=g)
    labels[0, 5:30] = IGNORE
    labels[2] = IGNORE  # a row with no target: it contributes nothing
    for softcap in (None, 2.0):
        logits = head(hidden)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        expected = _reference(logits, labels)
        want = torch.autograd.grad(expected, [hidden, head.weight, head.bias])
        got = chunked_ce(hidden, head, labels, chunk=9, softcap=softcap)
        grads = torch.autograd.grad(got, [hidden, head.weight, head.bias])
        assert float(got) == pytest.approx(float(expected), rel=1e-6)
        for a, b in zip(grads, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert not grads[0][2].any()
    # the weight tensor in place of the module, and the sum reduction
    plain = chunked_ce(hidden, head.weight, labels, reduction="sum")
    ref = _reference(head.weight.new_zeros(()) + hidden @ head.weight.T, labels, num_items=1)
    assert float(plain) == pytest.approx(float(ref), rel=1e-6)


def test_no_target_at_all():
    hidden = torch.randn(1, 8, 4, requires_grad=True)
    head = torch.nn.Linear(4, 11, bias=False)
    labels = torch.full((1, 8), IGNORE)
    # transformers' mean over no target is 0/0 = NaN (the Trainer's guard keeps such rows out); the sum is 0
    assert torch.isnan(chunked_ce(hidden, head, labels)) and torch.isnan(_reference(head(hidden), labels))
    total = chunked_ce(hidden, head, labels, reduction="sum")
    total.backward()
    assert float(total) == 0.0 and not hidden.grad.any() and not head.weight.grad.any()


def test_bfloat16_and_autocast_are_close_to_the_models_loss():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 64, 32, generator=g)
    head = torch.nn.Linear(32, 500, bias=False)
    labels = torch.randint(0, 500, (2, 64), generator=g)
    exact = float(_reference(head(hidden), labels))
    # bf16 tensors, as a model loaded in bfloat16
    bf = chunked_ce(hidden.bfloat16(), head.weight.bfloat16(), labels, chunk=16)
    assert abs(float(bf) - exact) / exact < 1e-2
    # float32 weights under autocast, as the Trainer's bf16 mixed precision: the head runs in bfloat16
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(head(h), labels)
        got = chunked_ce(h, head, labels, chunk=16)
    want = torch.autograd.grad(ref, [h, head.weight])
    grads = torch.autograd.grad(got, [h, head.weight])
    assert float(got) == pytest.approx(float(ref), rel=1e-3) and grads[1].dtype == torch.float32
    for a, b in zip(grads, want, strict=True):
        assert float((a - b).norm() / b.norm()) < 2e-2


def test_lora_and_a_trained_tied_embedding_get_the_models_gradients():
    """LongLoRA's LoRA+ on a tied model: the head is peft's wrapper around the trained embedding copy; the LoRA
    factors, the norms and that embedding (input and head at once) get the model's own gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longkit.models.tiny import _COMMON

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**_COMMON, "tie_word_embeddings": True}))
    ids, labels = _batch()
    for spec in ("longlora:lora_r=4", "continual:lora=true,lora_r=4"):
        peft_model = create_recipe(spec).wrap(copy.deepcopy(base))
        # LoRA's B starts at zero: move it, so that the adapters change the hidden states
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        assert head_of(peft_model) is not None
        expected = peft_model(input_ids=ids, labels=labels, use_cache=False).loss
        expected.backward()
        want = _grads(peft_model)
        peft_model.zero_grad()
        got = model_chunked_ce(peft_model, {"input_ids": ids, "labels": labels}, chunk=5)
        got.backward()
        assert float(got) == pytest.approx(float(expected), rel=1e-6)
        _assert_same_grads(_grads(peft_model), want)
        if spec.startswith("longlora"):
            assert any("embed_tokens.modules_to_save" in n for n in want)


def test_heads_it_does_not_reproduce_fall_back_or_stop():
    from peft import LoraConfig, get_peft_model

    m = copy.deepcopy(longkit.load_model("tiny-llama").model)
    assert head_of(m) is not None
    # LoRA on the head itself: its forward is not weight @ h -> the model's own loss
    lora_head = get_peft_model(copy.deepcopy(m), LoraConfig(r=2, target_modules=["lm_head"]))
    assert head_of(lora_head) is None
    assert model_chunked_ce(lora_head, dict(zip(("input_ids", "labels"), _batch(), strict=True))) is None
    # logits rescaled after the head (Cohere's logit_scale)
    scaled = copy.deepcopy(m)
    scaled.config.logit_scale = 0.5
    assert head_of(scaled) is None
    # something the checks do not know about changes the logits: the last-position check stops the run
    odd = copy.deepcopy(m)
    odd.lm_head.register_forward_hook(lambda mod, args, out: out * 1.5)
    with pytest.raises(TrainError, match="does not reproduce LlamaForCausalLM's logits.*ce_chunk=0"):
        model_chunked_ce(odd, dict(zip(("input_ids", "labels"), _batch(), strict=True)))


def test_recipe_uses_it_for_ce_and_not_for_ce_chunk_0_or_longce(tiny_llama):
    ids, labels = _batch()
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        own = tiny_llama.model(**batch, use_cache=False).loss
        got = create_recipe("continual:ce_chunk=3").compute_loss(tiny_llama.model, dict(batch))
    assert float(got) == pytest.approx(float(own), rel=1e-6)
    assert create_recipe("continual:ce_chunk=0").compute_loss(tiny_llama.model, dict(batch)) is None


@pytest.mark.parametrize("call, match", [
    (lambda h, w, y: chunked_ce(h[0], w, y), "'hidden' must be a float tensor"),
    (lambda h, w, y: chunked_ce(h, torch.nn.Embedding(11, 4), y), "'head' must be a torch.nn.Linear"),
    (lambda h, w, y: chunked_ce(h, torch.nn.Linear(5, 11), y), "'head' must map the hidden size 4"),
    (lambda h, w, y: chunked_ce(h, w, y[:, :3]), r"'labels' must be an int tensor \(B, T\) = \(1, 6\)"),
    (lambda h, w, y: chunked_ce(h, w, y + 20), r"'labels' must hold token ids in \[0, 11\)"),
    (lambda h, w, y: chunked_ce(h[:, :1], w, y[:, :1]), "needs T >= 2"),
    (lambda h, w, y: chunked_ce(h, w, y, chunk=0), "'chunk' must be an int >= 1"),
    (lambda h, w, y: chunked_ce(h, w, y, softcap=0.0), "'softcap' must be None or a finite number > 0"),
    (lambda h, w, y: chunked_ce(h, w, y, reduction="max"), "'reduction' must be one of mean, sum"),
])
def test_bad_input(call, match):
    hidden, head, labels = torch.randn(1, 6, 4), torch.nn.Linear(4, 11), torch.randint(0, 11, (1, 6))
    with pytest.raises(MethodError, match=match):
        call(hidden, head, labels)
    with pytest.raises(MethodError, match="parameter 'ce_chunk' must be >= 0"):
        create_recipe("continual:ce_chunk=-1")


def _run(docs, out, recipe, **kw):
    config = dict(recipe=recipe, model="tiny-llama", data=[str(docs), "kv-retrieval:count=4,share=0.5"],
                  target_length=640, steps=3, save_every=3, out=str(out), precision="fp32", progress=False,
                  eval_every=3, eval_data=["kv-retrieval:seed=1,count=2"], eval_rows=2)
    return train(TrainConfig(**{**config, **kw}))


def test_a_training_run_gives_the_old_paths_losses_and_weights(docs, tmp_path):
    """Three steps of 2 accumulated rows (prose and answer-only retrieval chats): the chunked loss (chunks of 100
    rows: every full row is cut into 7, the last one partial) logs the losses, held-out losses and final weights
    of the model's own loss, within float32 rounding (1e-5). Checked by hand: skipping a chunk's last row or
    scoring one twice moves these losses by far more than that."""
    common = "lr=3e-3,warmup_ratio=0,grad_accum=2"
    old = _run(docs, tmp_path / "old", f"continual:{common},ce_chunk=0")
    new = _run(docs, tmp_path / "new", f"continual:{common},ce_chunk=100")
    losses_old, losses_new = [r["loss"] for r in read_log(old)], [r["loss"] for r in read_log(new)]
    assert len(losses_old) == 3 and losses_new == pytest.approx(losses_old, rel=1e-5)
    held_old, held_new = [r["eval_loss"] for r in read_eval_log(old)], [r["eval_loss"] for r in read_eval_log(new)]
    assert len(held_old) == 2 and held_new == pytest.approx(held_old, rel=1e-5)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(old).state_dict()
    b = AutoModelForCausalLM.from_pretrained(new).state_dict()
    start = longkit.load_model("tiny-llama").model.state_dict()
    for k, v in a.items():
        if "rotary" not in k:
            torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # the runs trained (the head too): equal weights are not merely the untouched start
    assert float((a["lm_head.weight"] - start["lm_head.weight"]).abs().max()) > 1e-3
