"""The training run (runtime/train.py) and the continual recipe: loss falls, the saved model reloads with the RoPE
method trained in, LoRA merges, kill -9 then resume repeats the same losses, a NaN loss stops the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import longkit
from conftest import REPO
from longkit.errors import MethodError, TrainError
from longkit.runtime.train import TrainConfig, read_eval_log, read_log, train, trained_config
from longkit.seam import MethodSpec
from longkit.train import RECIPES, create_recipe
from longkit.train import data as D


def _config(docs, out, **kw):
    base = dict(recipe="continual:lr=3e-3,warmup_ratio=0", model="tiny-llama", data=[str(docs)], target_length=640,
                steps=6, save_every=3, out=str(out), precision="fp32", progress=False)
    return TrainConfig(**{**base, **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_recipe_registry_and_parameters():
    assert "continual" in RECIPES
    r = create_recipe("continual:lora=true,lora_r=4")
    assert r.lora is True and r.lora_r == 4 and r.label() == "continual:lora=True,lora_r=4"
    with pytest.raises(MethodError, match="'lr' must be > 0.0"):
        create_recipe("continual:lr=0")
    with pytest.raises(MethodError, match="unknown training recipe 'nope'; valid training recipes: continual"):
        create_recipe("nope")
    with pytest.raises(MethodError, match="has no parameter 'rank'"):
        create_recipe("continual:rank=2")


def test_loss_falls_and_saved_model_reloads_with_the_rope_trained_in(docs, tmp_path):
    out = train(_config(docs, tmp_path / "run", rope="yarn:factor=2"))
    losses = [r["loss"] for r in read_log(out)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["factor"] == 2.0
    assert cfg["rope_parameters"]["original_max_position_embeddings"] == 512 and cfg["max_position_embeddings"] == 1024
    report = json.loads((out / "train_report.json").read_text())
    assert report["tokens_seen"] == 6 * 640 and (out / "loss.png").stat().st_size > 0
    assert not (out / "checkpoints").exists()

    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (1, 700), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    lm = longkit.load_model(str(out), dtype="float32")
    assert lm.model.config.rope_parameters["rope_type"] == "yarn"
    torch.testing.assert_close(_logits(plain, ids), _logits(lm.model, ids), rtol=0, atol=0)
    # the trained weights under the method give these logits; the untrained model's differ
    fresh = longkit.load_model("tiny-llama").model
    with longkit.apply(fresh, rope="yarn:factor=2"):
        assert not torch.allclose(_logits(fresh, ids), _logits(plain, ids), atol=1e-3)
    # a rerun of a finished run is a no-op that returns the same directory
    assert train(_config(docs, tmp_path / "run", rope="yarn:factor=2")) == out


@pytest.mark.parametrize("rope", ["yarn:factor=4", "abf:rope_theta=500000", "linear:factor=2", "ntk:factor=2",
                                  "dynamic:factor=2", "llama3:factor=4"])
def test_trained_config_reproduces_the_method_in_plain_transformers(rope, tmp_path):
    """What train() writes (the method's rope_parameters) makes transformers build the rotary embedding the method
    swapped in: the same weights saved with that config give the logits of the model under the method."""
    from transformers import AutoModelForCausalLM

    model = longkit.load_model("tiny-llama").model
    spec = MethodSpec.parse(f"rope={rope}")
    ids = torch.randint(0, 256, (1, 900), generator=torch.Generator().manual_seed(1))
    with longkit.apply(model, spec):
        expected = _logits(model, ids)
    cfg = trained_config(model, spec.rope, 1024)
    saved = longkit.load_model("tiny-llama").model
    saved.config = cfg
    saved.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_lora_run_merges_into_a_plain_model(docs, tmp_path):
    out = train(_config(docs, tmp_path / "lora", recipe="continual:lora=true,lr=1e-2,warmup_ratio=0",
                        rope="abf:rope_theta=100000", steps=3))
    assert (out / "adapter" / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in weights), "the saved model must be plain (LoRA merged)"
    base = longkit.load_model("tiny-llama").model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q], base[q]), "the merged q_proj must carry the adapter's update"
    torch.testing.assert_close(weights["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_theta"] == 100000.0
    longkit.load_model(str(out))


KILL = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from longkit.runtime.train import TrainConfig, train

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:      # after checkpoint-3, mid-way to checkpoint-6
                os.kill(os.getpid(), signal.SIGKILL)

    config = TrainConfig(**__import__("json").loads(sys.argv[1]))
    train(config, callbacks=[Kill()])
""")


def test_kill_9_then_resume_gives_the_uninterrupted_losses(docs, tmp_path):
    # with a held-out evaluation every 2 steps (and before the first): it repeats too
    settings = dict(recipe="continual:lr=3e-3,warmup_ratio=0.2", model="tiny-llama", data=[str(docs)],
                    target_length=640, steps=8, save_every=3, out=str(tmp_path / "killed"), precision="fp32",
                    progress=False, rope="yarn:factor=2", eval_every=2, eval_data=["kv-retrieval:seed=1,count=2"])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", KILL, json.dumps(settings)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "checkpoint-3").is_dir() and not (killed / "model.safetensors").exists()
    # killed inside step 5 (its update done, not yet logged or checkpointed)
    assert [r["step"] for r in read_log(killed)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_eval_log(killed)] == [0, 2, 4]
    train(TrainConfig(**settings))                     # the same command again: resumes from checkpoint-3
    straight = train(TrainConfig(**{**settings, "out": str(tmp_path / "straight")}))
    resumed = [r["loss"] for r in read_log(killed)]
    expected = [r["loss"] for r in read_log(straight)]
    assert [r["step"] for r in read_log(killed)] == list(range(1, 9))
    assert resumed == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert json.loads((killed / "train_report.json").read_text())["resumed_from_step"] == 3
    # the evaluations after the checkpoint were dropped and redone once: 0, 2 kept, 4, 6, 8 after resuming
    held, held_straight = read_eval_log(killed), read_eval_log(straight)
    assert [r["step"] for r in held] == [r["step"] for r in held_straight] == [0, 2, 4, 6, 8]
    assert [r["eval_loss"] for r in held] == pytest.approx([r["eval_loss"] for r in held_straight], rel=1e-6, abs=1e-6)


def test_held_out_loss_at_its_steps_on_pose_rows(docs, tmp_path):
    """PoSE + LoRA with 50% synthetic retrieval: the held-out kv rows are scored every 2 steps, before the first and
    after the last; step 0's loss is the untrained model's mean loss over the same rows under the same PoSE
    transform."""
    recipe = "pose:window=512,lora=true,lr=3e-3,warmup_ratio=0"
    out = train(_config(docs, tmp_path / "eval", recipe=recipe, data=[str(docs), "kv-retrieval:count=4,share=0.5"],
                        target_length=1024, steps=5, save_every=5, eval_every=2, eval_rows=3,
                        eval_data=["kv-retrieval:seed=1,count=3"]))
    held = read_eval_log(out)
    assert [r["step"] for r in held] == [0, 2, 4, 5] and [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in held] == [0, 1024, 2048, 2560] and held[2]["eval_loss"] != held[0]["eval_loss"]

    lm = longkit.load_model("tiny-llama", dtype="float32")
    pose = create_recipe(recipe)
    pose.train_length(1024)
    tok = lm.tokenizer
    rows = D.build(D.read_source("kv-retrieval", tokenizer=tok, row_length=512, params={"seed": "1", "count": "3"}),
                   tok, 512, seed=0)
    assert len(rows) == 3
    losses = []
    with torch.no_grad():
        for i in range(3):
            row = pose.transform({k: rows[i][k] for k in ("input_ids", "labels", "position_ids")}, i, 0)
            batch = {k: v.unsqueeze(0) for k, v in row.items()}
            losses.append(float(lm.model(**batch, use_cache=False).loss))
    assert held[0]["eval_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)

    report = json.loads((out / "train_report.json").read_text())
    assert (report["first_eval_loss"], report["final_eval_loss"]) == (held[0]["eval_loss"], held[-1]["eval_loss"])
    assert report["eval_every"] == 2 and report["eval_rows"] == 3 and list(report["eval_losses"]) == ["0", "2", "4", "5"]
    assert report["eval_data"]["sources"]["kv-retrieval"]["documents"] == 3
    kv = report["data"]["sources"]["kv-retrieval"]
    assert kv["requested_share"] == 0.5 and abs(kv["sampled_tokens"] - 0.5 * 5 * 512) <= 512
    assert json.loads((out / "eval_data_stats.json").read_text()) == report["eval_data"]
    assert (out / "loss.png").stat().st_size > 0


def test_nan_loss_stops_with_the_last_good_checkpoint(docs, tmp_path):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        """From step 4 on, the weights are NaN: the loss of step 5 is NaN."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    out = tmp_path / "nan"
    with pytest.raises(TrainError, match=r"loss is nan at step 5: training stopped; the last good checkpoint is "
                                         r".*checkpoint-4"):
        train(_config(docs, out, steps=8, save_every=2), callbacks=[Poison()])
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints[-1] == "checkpoint-4" and not (out / "model.safetensors").exists()
    assert json.loads((out / "train_run.json").read_text())["status"] == "stopped"


def test_bad_runs_are_refused_before_anything_is_written(docs, tmp_path):
    with pytest.raises(MethodError, match="'target_length' = 512 must be larger than the model's trained window 512"):
        train(_config(docs, tmp_path / "a", target_length=512))
    assert not (tmp_path / "a").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(TrainError, match="holds no longkit training run"):
        train(_config(docs, other))
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_cli_train_and_methods_kind_train(docs, tmp_path, capsys):
    from longkit.cli import main

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as ex:
        main(["train", "continual:lr=3e-3", "--model", "tiny-llama", "--data", str(docs), "--target-length", "640",
              "--rope", "linear:factor=2", "--steps", "2", "--out", str(out), "--precision", "fp32"])
    assert ex.value.code == 0, capsys.readouterr()
    assert f"longkit eval --model {out}" in capsys.readouterr().out.replace("\n", "")
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "linear"
    with pytest.raises(SystemExit):
        main(["methods", "--kind", "train", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == ["continual", "longlora", "pose"] and listed[0]["kind"] == "train"
    assert {"lr", "lora", "lora_r"} <= {p["name"] for p in listed[0]["parameters"]}


def test_cli_train_with_shares_and_held_out_loss(docs, tmp_path, capsys):
    from longkit.cli import main

    out = tmp_path / "cli-eval"
    with pytest.raises(SystemExit) as ex:
        main(["train", "continual:lr=3e-3", "--model", "tiny-llama", "--data", str(docs), "--data",
              "kv-retrieval:count=2,share=0.4", "--target-length", "640", "--steps", "2", "--out", str(out),
              "--precision", "fp32", "--eval-every", "1", "--eval-data", "kv-retrieval:seed=1,count=1",
              "--eval-rows", "1"])
    assert ex.value.code == 0, capsys.readouterr()
    assert "held-out loss" in capsys.readouterr().out.replace("\n", "")
    assert [r["step"] for r in read_eval_log(out)] == [0, 1, 2]
    stats = json.loads((out / "data_stats.json").read_text())["sources"]["kv-retrieval"]
    assert stats["requested_share"] == 0.4 and stats["sampled_documents"] >= 1


def test_rows_without_a_target_weigh_zero_instead_of_stopping_the_run(tmp_path):
    """Answer-only documents longer than a row leave rows that hold only a prompt: no token to predict. A mean
    over no target is 0/0 = NaN, which stopped the run; such a step now gives a zero loss, changes no weight, is
    marked in the log and left out of the report and plot, and the data statistics count the rows."""
    rows = [{"prompt": ("lorem ipsum dolor " * 80) + f"Q{i}?", "completion": f" answer {i}"} for i in range(6)]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train(_config(data, tmp_path / "run", steps=4, save_every=4))
    log = read_log(out)
    empty = [r for r in log if r.get("no_targets")]
    assert len(log) == 4 and empty and len(empty) < 4, log
    assert all(r["loss"] == 0.0 for r in empty) and all(r["loss"] > 0 for r in log if not r.get("no_targets"))
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["rows_without_targets"] >= len(empty)
    report = json.loads((out / "train_report.json").read_text())
    assert report["first_loss"] > 0 and report["final_loss"] > 0


def test_a_row_without_a_target_changes_no_weight(tmp_path):
    """The zero loss of a row without targets has zero gradients: the weights after that step equal those before
    (weight decay off, so only the gradient could move them)."""
    rows = [{"prompt": "x" * 1500, "completion": " y"}]
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")
    before = {k: v.clone() for k, v in longkit.load_model("tiny-llama", dtype="float32").model.state_dict().items()}
    out = train(_config(data, tmp_path / "run", steps=1, save_every=1,
                        recipe="continual:lr=3e-3,warmup_ratio=0,weight_decay=0"))
    log = read_log(out)
    assert log[0].get("no_targets") and log[0]["loss"] == 0.0
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in before.items():
        if "rotary" not in k:
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)
