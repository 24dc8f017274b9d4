"""``longkit train --seq-parallel ring|ulysses`` under ``torchrun`` with 2 gloo ranks on CPU: every rank trains on
the same packed rows, each holding half of their tokens, and the run equals one process training the same rows
(per-step losses, gradient norms, final weights), with packed documents, PoSE rows, LoRA, gradient checkpointing and
a crash + resume; what it cannot train exactly is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from longkit.errors import TrainError
from longkit.models import load_model
from longkit.runtime.train import TrainConfig, read_log, train

# Run on each rank: the first run fails inside step 3 (after checkpoint-2) and the same call resumes it, as a rerun
# of the command would; then the bad-length run must be refused before it writes anything.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from transformers import TrainerCallback
    from longkit.errors import TrainError
    from longkit.runtime.train import TrainConfig, train

    class Crash(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("crash in step 3")

    runs, bad = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for i, settings in enumerate(runs):
        config = TrainConfig(**settings)
        if i == 0:
            try:
                train(config, callbacks=[Crash()])
            except RuntimeError as err:
                assert "crash in step 3" in str(err), err
            else:
                raise SystemExit("the crash did not happen")
        train(config)
    for settings in bad:
        try:
            train(TrainConfig(**settings))
        except TrainError as err:
            print("REFUSED", err, flush=True)
            assert not Path(settings["out"]).exists()
        else:
            raise SystemExit(f"not refused: {settings}")
""")


def _settings(tmp_path, docs, name, **changes):
    base = dict(recipe="continual:lr=3e-3,warmup_ratio=0", model="tiny-llama", data=[str(docs)], target_length=640,
                steps=2, save_every=2, out=str(tmp_path / name), precision="fp32", progress=False,
                rope="yarn:factor=2")
    return {**base, **changes}


def test_ring_and_ulysses_on_two_gloo_ranks_train_as_one_process(docs, tmp_path):
    # Answer-only rows longer than a row: most rows hold only a prompt (no target; they weigh zero), one holds the
    # answers. The sharded loss must give the same zero steps and the same trained step as one process.
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": ("lorem ipsum dolor " * 80) + f"Q{i}?", "completion": f" a {i}"})
                               + "\n" for i in range(6)))
    runs = [
        # packed documents (position ids restarting per document), gradient checkpointing, crash + resume
        _settings(tmp_path, docs, "ring", seq_parallel="ring", steps=4),
        # PoSE rows: skipped position ids, documents from the block-causal mask
        _settings(tmp_path, docs, "ulysses-pose", seq_parallel="ulysses", target_length=1024,
                  recipe="pose:window=320,lr=3e-3,warmup_ratio=0", rope="yarn:factor=4"),
        # LoRA (peft) adapters merged into the saved model, without activation checkpointing
        _settings(tmp_path, docs, "ring-lora", seq_parallel="ring", gradient_checkpointing=False,
                  recipe="continual:lora=true,lr=3e-2,warmup_ratio=0"),
        # answer-only data, with steps that have no token to predict
        # (the one trained step is the last, at the cosine schedule's low end: a larger rate makes it visible)
        _settings(tmp_path, docs, "ring-answers", seq_parallel="ring", data=[str(answers)], steps=3, save_every=3,
                  recipe="continual:lr=3e-2,warmup_ratio=0"),
    ]
    bad = [
        # 642 is even (Ulysses would take it) but not a multiple of 4: the zigzag layout needs 2 x 2 chunks.
        _settings(tmp_path, docs, "bad", seq_parallel="ring", target_length=642),
        # Gemma 3's sliding-window layers (window 16) cannot be attended across shards.
        _settings(tmp_path, docs, "bad", seq_parallel="ulysses", model="tiny-gemma3", target_length=1024, rope=None),
    ]
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)
    # --standalone: torchrun picks a free port for its own rendezvous
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), json.dumps(runs), json.dumps(bad)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("REFUSED") == 2 * len(bad), proc.stdout[-2000:]
    assert "needs rows of a multiple of 4 tokens (2 x the number of ranks, the zigzag layout); 'target_length' = " \
           "642 is not" in proc.stdout
    assert "'ulysses': the model has sliding-window attention (window 16, layer model.layers.0.self_attn) shorter " \
           "than the 1024-token rows" in proc.stdout

    initial = load_model("tiny-llama", dtype="float32", seed=0).model.state_dict()
    for settings in runs:
        sp = tmp_path / settings["out"]
        one = train(TrainConfig(**{**settings, "seq_parallel": None, "out": str(tmp_path / (sp.name + "-one"))}))
        log, expected = read_log(sp), read_log(one)
        steps = settings["steps"]
        assert [r["step"] for r in log] == list(range(1, steps + 1))
        # the rows of one process (not W x as many): the ranks share them
        assert [r["tokens"] for r in log] == [r["tokens"] for r in expected]
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in expected], rel=1e-5, abs=1e-5)
        assert [r["grad_norm"] for r in log] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4, abs=1e-5)
        assert [r.get("no_targets", False) for r in log] == [r.get("no_targets", False) for r in expected]
        stats = json.loads((sp / "data_stats.json").read_text())
        if sp.name == "ring-answers":
            assert stats["rows_without_targets"] > 0 and any(r.get("no_targets") for r in log), log
            assert not all(r.get("no_targets") for r in log), log
        else:
            assert stats["documents"] > stats["sequences"], "the rows should pack several documents"
        a, b = load_file(sp / "model.safetensors"), load_file(one / "model.safetensors")
        assert a.keys() == b.keys()
        for name in b:
            # AdamW divides by sqrt(v): where a gradient is near zero the different summation order (~1e-8)
            # shows as ~1e-5 in a few weights after a few steps (as in the DDP test).
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        # The comparison means something: training moved the weights 10x beyond that tolerance.
        assert max(float((a[n] - initial[n]).abs().max()) for n in a if n in initial) > 1e-3
        run = json.loads((sp / "train_run.json").read_text())
        assert run["status"] == "done"
        assert run["identity"]["seq_parallel"] == settings["seq_parallel"] and run["identity"]["world_size"] == 2
    report = json.loads((tmp_path / "ring" / "train_report.json").read_text())
    assert report["resumed_from_step"] == 2 and report["seq_parallel"] == "ring"
    assert (tmp_path / "ring-lora" / "adapter").is_dir()


@pytest.mark.parametrize(("changes", "expect"), [
    ({"seq_parallel": "ring"}, r"'seq_parallel' = 'ring' needs several processes: launch with `torchrun "
                               r"--nproc-per-node N longkit train \.\.\.`"),
    ({"seq_parallel": "ring", "attention": "sliding:window=64"}, r"'seq_parallel' = 'ring' is the run's attention "
                                                                 r"method .* cannot run with the attention method"),
    ({"seq_parallel": "ulysses", "recipe": "longlora"}, r"that training recipe 'longlora' sets"),
    ({"seq_parallel": "ring", "recipe": "continual:loss=longce"}, r"works with loss=ce only"),
    ({"seq_parallel": "rings"}, r"parameter 'seq_parallel' must be one of ring, ulysses \(got 'rings'\)"),
])
def test_seq_parallel_refusals_in_one_process(docs, tmp_path, changes, expect):
    with pytest.raises(TrainError, match=expect):
        train(TrainConfig(**_settings(tmp_path, docs, "out", **changes)))
    assert not (tmp_path / "out").exists()


def test_seq_parallel_under_fsdp_is_refused(docs, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TrainError, match=r"'seq_parallel' = 'ulysses' cannot run under FSDP"):
        train(TrainConfig(**_settings(tmp_path, docs, "out", seq_parallel="ulysses")))
    assert not (tmp_path / "out").exists()
