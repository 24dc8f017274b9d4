"""benchmarks/memory/infllm_recall.py: the answer's tokens found in the prompt, and the memory blocks said to hold
them are the blocks InfLLM actually stored them in."""

from __future__ import annotations

import torch

from conftest import REPO
from grid_records import load_script

SCRIPT = REPO / "benchmarks" / "memory" / "infllm_recall.py"


def test_needle_blocks_are_the_blocks_infllm_stores_the_tokens_in():
    from longkit.memory.infllm import InfLLM, InfLLMState

    recall = load_script(SCRIPT)
    cfg = InfLLM(block_size=8, n_init=4, n_local=16, topk=2, repr_topk=2, exec_chunk=8)
    state = InfLLMState(cfg)
    L, H, D = 101, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, H, L, D, generator=g), torch.randn(1, H, L, D, generator=g)
    # Each value carries its token index, so a stored block says which tokens it holds.
    v = torch.arange(L, dtype=torch.float32).view(1, 1, L, 1).expand(1, H, L, D).contiguous()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    for st in range(0, L, cfg.exec_chunk):
        ed = min(L, st + cfg.exec_chunk)
        state.forward(q[:, :, st:ed], k[:, :, st:ed], v[:, :, st:ed], torch.arange(st, ed), D**-0.5, inv_freq)
    held = {int(t): b for b, blk in enumerate(state.block_v) for t in blk[0, 0, :, 0].tolist()}
    assert len(held) == state.n_blocks() * cfg.block_size > 0
    for t in range(L):
        blocks = recall.needle_blocks([t], L, cfg.n_init, cfg.n_local, cfg.block_size)
        if t < cfg.n_init or t >= L - cfg.n_local:
            assert blocks is None, t  # initial tokens or the local window: seen without retrieval
        elif t in held:
            assert blocks == [held[t]], t
        else:
            # The window's fringe: local at the answer step, though the formula counts it far.
            assert t >= L - cfg.n_local - cfg.block_size, t


def test_answer_positions_finds_every_occurrence():
    from longkit.models import tiny_model

    _, tok = tiny_model("tiny-llama")
    recall = load_script(SCRIPT)
    ids = tok.encode("filler text. The pass key is 41834. Remember it. 41834 is the pass key.", add_special_tokens=False)
    found = recall.answer_positions(tok, ids, "41834")
    # Both occurrences, nothing else (the leading space may be a token of its own).
    assert tok.decode([ids[i] for i in found]).replace(" ", "") == "4183441834"
    assert recall.answer_positions(tok, ids, "99999") == []
