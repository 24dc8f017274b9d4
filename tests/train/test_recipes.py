"""The pose and longlora recipes and the loss setting (ce / longce), on tiny models."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import longkit
from conftest import REPO
from longkit.errors import MethodError
from longkit.runtime.train import PackedRows, TrainConfig, read_log, train
from longkit.train import create_recipe
from longkit.train import data as D
from longkit.train.pose import pose_sample
from longkit.train.pose_recipe import row_documents

TARGET = 640




@pytest.fixture(scope="module")
def lm():
    return longkit.load_model("tiny-llama")


def _packed(docs, tokenizer, length, rows=12):
    return D.build(D.read_source(str(docs)), tokenizer, length, total_tokens=rows * length, seed=0)


def _config(docs, out, **kw):
    base = dict(model="tiny-llama", data=[str(docs)], target_length=TARGET, steps=2, save_every=2, out=str(out),
                precision="fp32", progress=False)
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------------------- pose


def test_pose_rows_follow_the_rule_per_document_and_cover_the_target(docs, lm):
    recipe = create_recipe("pose:window=64")
    assert recipe.train_length(TARGET) == 64
    packed = _packed(docs, lm.tokenizer, 64, rows=40)
    top = 0
    for i in range(len(packed)):
        row = {k: packed[i][k] for k in ("input_ids", "labels", "position_ids")}
        got = recipe.transform(row, i, seed=7)
        assert torch.equal(got["input_ids"], row["input_ids"]) and torch.equal(got["labels"], row["labels"])
        # the specification: one stream per (seed, row), one pose_sample per document with a target, in order
        rng = random.Random(f"pose:7:{i}")
        expected = row["position_ids"].clone()
        for a, b in row_documents(row["position_ids"]):
            if b - a >= 2 and (row["labels"][a:b] != -100).any():
                s = pose_sample(b - a, b - a, TARGET, rng=rng)
                expected[a:b] = s.position_ids
                p = got["position_ids"][a:b]
                assert p[0] == 0 and int(p.max()) < TARGET
                assert p[: s.first].tolist() == list(range(s.first))
                assert p[s.first :].tolist() == list(range(s.first + s.skip, b - a + s.skip))
        assert torch.equal(got["position_ids"], expected)
        docs_of = packed[i]["doc_ids"]
        assert torch.equal(got["attention_mask"], D.block_causal_mask(docs_of)[0])
        top = max(top, int(got["position_ids"].max()))
    # 40 rows of skips uniform in [0, 640 - L]: positions reach near the target, far past the window
    assert top > 0.8 * TARGET, top
    # another seed draws other positions; the same (seed, row) the same ones
    row0 = {k: packed[0][k] for k in ("input_ids", "labels", "position_ids")}
    assert not torch.equal(recipe.transform(row0, 0, 8)["position_ids"], recipe.transform(row0, 0, 7)["position_ids"])
    assert torch.equal(recipe.transform(row0, 0, 7)["position_ids"], recipe.transform(row0, 0, 7)["position_ids"])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_pose_row_forward_equals_each_document_alone(docs, impl):
    """The row's mask keeps both chunks of a document together and documents apart (transformers would take the
    skip for a document boundary): each document's logits are those of the document run alone at its positions."""
    lm = longkit.load_model("tiny-llama", attn_implementation=impl)
    recipe = create_recipe("pose:window=128")
    recipe.train_length(TARGET)
    packed = _packed(docs, lm.tokenizer, 128)
    i = next(i for i in range(len(packed)) if len(row_documents(packed[i]["position_ids"])) >= 3)
    row = recipe.transform({k: packed[i][k] for k in ("input_ids", "labels", "position_ids")}, i, 0)
    batch = {k: v.unsqueeze(0) for k, v in row.items()}
    recipe.compute_loss(lm.model, batch)          # eager: turns the mask additive, in place
    with torch.no_grad():
        full = lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        attention_mask=batch["attention_mask"], use_cache=False).logits[0]
        checked = 0
        for a, b in row_documents(row["position_ids"]):
            if (row["labels"][a:b] != -100).any():
                pos = row["position_ids"][a:b]
                assert (pos.diff() > 1).any() or b - a < 2 or pos[-1] == b - a - 1
                alone = lm.model(input_ids=row["input_ids"][None, a:b], position_ids=pos[None],
                                 attention_mask=torch.ones(1, b - a, dtype=torch.long), use_cache=False).logits[0]
                torch.testing.assert_close(full[a:b], alone, rtol=1e-4, atol=1e-4)
                checked += 1
        assert checked >= 2


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_pose_single_document_rows_take_the_causal_path_with_the_same_logits(docs, impl):
    """A row that is one document (its block mask is the plain causal mask) is passed with an all-ones 2-D mask,
    so sdpa can run its causal kernel; its logits equal those under the explicit block mask (with no mask at all,
    transformers would read PoSE's skip as a document boundary, and they would differ). Rows of several documents
    keep their block mask."""
    lm = longkit.load_model("tiny-llama", attn_implementation=impl)
    recipe = create_recipe("pose:window=128")
    recipe.train_length(TARGET)
    packed = _packed(docs, lm.tokenizer, 128, rows=40)
    single = next(i for i in range(len(packed)) if len(row_documents(packed[i]["position_ids"])) == 1)
    several = next(i for i in range(len(packed)) if len(row_documents(packed[i]["position_ids"])) >= 2)
    for i in (single, several):
        row = recipe.transform({k: packed[i][k] for k in ("input_ids", "labels", "position_ids")}, i, 0)
        batch = {k: v.unsqueeze(0) for k, v in row.items()}
        explicit = batch["attention_mask"].clone()
        recipe.compute_loss(lm.model, batch)
        mask = batch["attention_mask"]
        if i == single:
            assert int((row["position_ids"].diff() > 1).sum()) == 1      # the skip is there
            assert mask.shape == (1, 128) and bool((mask == 1).all())
        else:
            assert mask.ndim == 4
        with torch.no_grad():
            got = lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                           use_cache=False).logits
            ref_mask = explicit if impl == "sdpa" else torch.zeros(explicit.shape).masked_fill(
                ~explicit, torch.finfo(torch.float32).min)
            ref = lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=ref_mask, use_cache=False).logits
            unmasked = lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(unmasked, ref, atol=1e-3)


def test_pose_trains_and_saves_the_rope_method(docs, tmp_path):
    out = train(_config(docs, tmp_path / "pose", recipe="pose:window=64,lr=3e-3,warmup_ratio=0",
                        rope="linear:factor=2", steps=3, save_every=3))
    losses = [r["loss"] for r in read_log(out)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 2.0
    assert json.loads((out / "train_report.json").read_text())["tokens_seen"] == 3 * 64


ROWS = textwrap.dedent("""
    import json, sys
    import longkit
    from longkit.runtime.train import PackedRows
    from longkit.train import create_recipe
    from longkit.train import data as D
    recipe = create_recipe("pose:window=64")
    recipe.train_length(640)
    lm = longkit.load_model("tiny-llama")
    packed = D.build(D.read_source(sys.argv[1]), lm.tokenizer, 64, total_tokens=12 * 64, seed=0)
    rows = PackedRows(packed, 30, recipe, 3)
    print(json.dumps([rows[i]["position_ids"].tolist() for i in (29, 4, 17)]))
""")


def test_pose_rows_are_the_same_in_a_resumed_process(docs, lm):
    """A resumed run (a new process, its own hash seed, rows read out of order) sees the same PoSE rows; the
    kill -9 resume of the run machinery itself is tests/train/test_run.py's."""
    recipe = create_recipe("pose:window=64")
    recipe.train_length(TARGET)
    rows = PackedRows(_packed(docs, lm.tokenizer, 64), 30, recipe, 3)
    here = [rows[i]["position_ids"].tolist() for i in (29, 4, 17)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", ROWS, str(docs)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here


def test_pose_bad_window():
    recipe = create_recipe("pose:window=1024")
    with pytest.raises(MethodError, match=r"parameter 'window' = 1024 must be smaller than 'target_length' = 1024"):
        recipe.check(window=512, target_length=1024)
    with pytest.raises(MethodError, match="'window' must be >= 2"):
        create_recipe("pose:window=1")


# ----------------------------------------------------------------------------------------------------- longlora


def test_longlora_trains_embeddings_norms_and_lora_and_saves_a_plain_model(docs, tmp_path):
    from safetensors.torch import load_file

    out = train(_config(docs, tmp_path / "ll", recipe="longlora:lr=1e-2,warmup_ratio=0"))
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k or "modules_to_save" in k for k in weights), "the saved model must be plain"
    base = longkit.load_model("tiny-llama").model.state_dict()
    changed = {k for k in base if not torch.equal(weights[k], base[k])}
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.1.post_attention_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.1.self_attn.v_proj.weight"):
        assert key in changed, key
    assert not any(".mlp." in k for k in changed), "LoRA+ leaves the MLPs frozen"
    # peft's adapter keeps the trained embeddings and norms next to the LoRA weights
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in adapter) and any("norm" in k for k in adapter)
    # the saved model is plain transformers with full attention: nothing of S2-Attn in its config
    cfg = json.loads((out / "config.json").read_text())
    assert "s2" not in json.dumps(cfg).lower()
    reloaded = longkit.load_model(str(out)).model
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    reloaded.train()        # training mode: a leftover S2-Attn would switch on here; plain attention gives eval's logits
    with torch.no_grad():
        a = reloaded(ids, use_cache=False).logits
        reloaded.eval()
        b = reloaded(ids, use_cache=False).logits
    torch.testing.assert_close(a, b)


def test_longlora_trains_under_s2_attn(docs, tmp_path):
    """Step 1's loss is the untrained model's loss on the same row: under S2-Attn it differs from full attention
    (a continual LoRA run on the same data and seed)."""
    s2 = read_log(train(_config(docs, tmp_path / "s2", recipe="longlora", steps=1, save_every=1)))[0]["loss"]
    full = read_log(train(_config(docs, tmp_path / "full", recipe="continual:lora=true", steps=1,
                                  save_every=1)))[0]["loss"]
    assert abs(s2 - full) > 1e-4, (s2, full)
    assert create_recipe("longlora:group_size_ratio=0.5").attention() == "s2_attn:group_size_ratio=0.5"
    with pytest.raises(MethodError, match="sets its own attention method"):
        train(_config(docs, tmp_path / "both", recipe="longlora", attention="s2_attn"))


# -------------------------------------------------------------------------------------------------------- losses


def _hand_longce(model, ids, pos, labels, trunc, stride, cap):
    """LongCE by hand: each target's short context is its window of the reference's sliding scheme, run alone."""
    T = ids.shape[1]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, position_ids=pos, use_cache=False).logits.float(), -1)
    total, count = 0.0, 0
    for t in range(1, T):
        if labels[0, t] == -100:
            continue
        long_nll = -float(logp[0, t - 1, ids[0, t]])
        w = 1.0
        if t >= trunc:
            a = (t - trunc) // stride * stride
            b = min(a + trunc + stride, T)
            with torch.no_grad():
                out = model(input_ids=ids[:, a:b], position_ids=pos[:, a:b], use_cache=False).logits.float()
            short_nll = -float(torch.log_softmax(out[0, t - 1 - a], -1)[ids[0, t]])
            w = min(torch.tensor(short_nll - long_nll).exp().item(), cap)
        total += w * long_nll
        count += 1
    return total / count


def test_longce_loss_equals_a_hand_computation_on_one_batch(docs, lm):
    recipe = create_recipe("continual:loss=longce,longce_short=48,longce_stride=16,longce_cap=3")
    packed = _packed(docs, lm.tokenizer, 160)
    batch = {k: packed[1][k][None] for k in ("input_ids", "labels", "position_ids")}
    got = recipe.compute_loss(lm.model, dict(batch))
    expected = _hand_longce(lm.model, batch["input_ids"], batch["position_ids"], batch["labels"], 48, 16, 3.0)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        ce = float(lm.model(**D.model_inputs(batch)).loss)
    assert abs(float(got) - ce) > 1e-3 and create_recipe("continual:ce_chunk=0").compute_loss(lm.model, batch) is None
    # loss=ce: the chunked cross-entropy, the model's own value
    with torch.no_grad():
        chunked = create_recipe("continual").compute_loss(lm.model, dict(batch))
    assert float(chunked) == pytest.approx(ce, rel=1e-6)


def test_longce_trains_and_keeps_the_trainer_scale_with_grad_accum(docs, tmp_path):
    """With a short context as long as the row every weight is 1: LongCE is cross-entropy, so its run (grad_accum
    2) logs the cross-entropy run's losses; a wrong scale under accumulation would double them."""
    common = "lr=3e-3,warmup_ratio=0,grad_accum=2"
    ce = [r["loss"] for r in read_log(train(_config(docs, tmp_path / "ce", recipe=f"continual:{common}")))]
    flat = [r["loss"] for r in read_log(train(_config(
        docs, tmp_path / "flat", recipe=f"continual:{common},loss=longce,longce_short={TARGET}")))]
    assert flat == pytest.approx(ce, rel=1e-5)
    weighted = [r["loss"] for r in read_log(train(_config(
        docs, tmp_path / "lce", recipe=f"continual:{common},loss=longce,longce_short=256,longce_stride=128")))]
    # an untrained model gains little from long context, so the weights stay near 1: a small but real difference
    assert all(torch.isfinite(torch.tensor(weighted))) and abs(weighted[0] - ce[0]) > 1e-5


def test_unknown_loss():
    with pytest.raises(MethodError, match="parameter 'loss' must be one of 'ce', 'longce'"):
        create_recipe("continual:loss=focal")
