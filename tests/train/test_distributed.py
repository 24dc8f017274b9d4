"""Scale-out through the Trainer (accelerate): ``train()`` under ``torchrun`` with 2 gloo ranks on CPU is DDP with
the global batch of one process (loss, gradients and weights equal), only rank 0 writes, checkpoints resume; FSDP,
which accelerate runs only on GPUs, is refused on CPU instead of silently running DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from longkit.errors import TrainError
from longkit.runtime.train import TrainConfig, read_log, train

# Run on each rank: rank 0 dumps the step-1 gradients (after DDP's all-reduce: the global gradients); every rank
# fails inside step 3 (after checkpoint-2), then the same call resumes, as a rerun of the command would.
SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import TrainerCallback
    from longkit.runtime.train import TrainConfig, train

    class Probe(TrainerCallback):
        def __init__(self, crash):
            self.crash = crash

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and state.is_world_process_zero:
                torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters()}, sys.argv[2])
            if self.crash and state.global_step == 2:
                raise RuntimeError("crash in step 3")

    config = TrainConfig(**json.loads(sys.argv[1]))
    try:
        train(config, callbacks=[Probe(crash=True)])
    except RuntimeError as err:
        assert "crash in step 3" in str(err), err
    else:
        raise SystemExit("the crash did not happen")
    train(config, callbacks=[Probe(crash=False)])
""")






def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_gloo_ranks_equals_one_process_with_the_global_batch(docs, tmp_path):
    settings = dict(recipe="continual:lr=3e-3,warmup_ratio=0", model="tiny-llama", data=[str(docs)],
                    target_length=640, steps=4, save_every=2, out=str(tmp_path / "ddp"), precision="fp32",
                    progress=False, rope="yarn:factor=2")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
                           json.dumps(settings), str(tmp_path / "grads_ddp.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = tmp_path / "ddp"

    class Grads:
        """The single process's step-1 gradients (the same hook as the ranks')."""

    from transformers import TrainerCallback

    class Dump(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                Grads.value = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    # One process with batch_size 2 = the global batch of 2 ranks x 1 row.
    one = train(TrainConfig(**{**settings, "recipe": "continual:lr=3e-3,warmup_ratio=0,batch_size=2",
                               "out": str(tmp_path / "one")}), callbacks=[Dump()])

    # Only rank 0 logs: each step once, steps 3-4 logged again after the resume from checkpoint-2 (trimmed).
    log, expected = read_log(ddp), read_log(one)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in expected], rel=1e-5, abs=1e-5)
    assert [r["grad_norm"] for r in log] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-5, abs=1e-5)
    assert [r["tokens"] for r in log] == [r["tokens"] for r in expected] == [2 * 640 * s for s in range(1, 5)]
    grads = torch.load(tmp_path / "grads_ddp.pt")
    assert grads.keys() == Grads.value.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, Grads.value[name], rtol=1e-5, atol=1e-5, msg=name)
    from safetensors.torch import load_file

    # After 4 AdamW steps (each moves a weight by up to lr = 3e-3): AdamW divides by sqrt(v), so where a gradient
    # is near zero the all-reduce's different summation order (~1e-8) shows as ~1e-5 in a few weights.
    a, b = load_file(ddp / "model.safetensors"), load_file(one / "model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4)
    report = json.loads((ddp / "train_report.json").read_text())
    assert report["resumed_from_step"] == 2 and report["tokens_seen"] == 4 * 2 * 640
    run = json.loads((ddp / "train_run.json").read_text())
    assert run["status"] == "done" and run["identity"]["world_size"] == 2
    assert not (ddp / "checkpoints").exists()
    # The number of ranks is part of the run (it sets the global batch): one process may not take the run over.
    with pytest.raises(TrainError, match=r"holds a different training run \(world_size: 2 there, None now\)"):
        train(TrainConfig(**settings))


def test_fsdp_on_cpu_is_refused_not_silently_ddp(docs, tmp_path, monkeypatch):
    # What `accelerate launch --use_fsdp` sets; accelerate would keep MULTI_CPU and drop the FSDP plugin on CPU.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = TrainConfig(recipe="continual", model="tiny-llama", data=[str(docs)], target_length=640, steps=1,
                         out=str(tmp_path / "fsdp"), progress=False)
    with pytest.raises(TrainError, match=r"FSDP was requested .* 'device' = 'cpu': accelerate runs FSDP only on GPUs"):
        train(config)
    assert not (tmp_path / "fsdp").exists()
