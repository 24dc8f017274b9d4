"""Plain references of the memory methods: loops over queries, keys and blocks, written from the papers'
definitions, the ground truth of the fast paths' tests.

InfLLM (Xiao et al. 2024, Sec. 3): a sequence is processed in chunks; for a query at sequence index s, key j is
seen at its true relative position when s - j < n_local (the local window), and at the fixed distance
``n_local - 1`` when it is farther and is an initial token, in a retrieved memory block, or in the block not yet
full. Block relevance to a chunk X: sim(X, B) = sum over heads h, queries x in X and representative tokens r of B
of q_x,h · k_r,h (keys at position 0, queries at the far position); the representative tokens of B for head h are
its ``repr_topk`` tokens with the largest attention received from the queries that saw them locally.
"""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, pos: torch.Tensor | float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., N, D) at positions pos (N,) or a scalar (rotate-half layout), in float64."""
    pos = torch.as_tensor(pos, dtype=torch.float64).reshape(-1, 1)
    ang = pos * inv_freq.double()[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    x = x.double()
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * ang.cos() + rot * ang.sin()


def infllm_block_selection_naive(q_far: torch.Tensor, k0: torch.Tensor, blocks: list[list[list[int]]], topk: int) -> list[int]:
    """Blocks a chunk retrieves: q_far (H, T, D) the chunk's queries at the far position, k0 (H, N, D) the keys at
    position 0 (one per query head), ``blocks[b][h]`` the representative token indices of block b for head h.
    All blocks when there are at most ``topk``; else the ``topk`` with the largest sim(X, B), ascending."""
    if len(blocks) <= topk:
        return list(range(len(blocks)))
    sims = []
    for b, reps in enumerate(blocks):
        s = 0.0
        for h in range(q_far.shape[0]):
            for x in range(q_far.shape[1]):
                for r in reps[h]:
                    s += float(q_far[h, x].double() @ k0[h, r].double())
        sims.append((s, b))
    return sorted(b for _, b in sorted(sims, reverse=True)[:topk])


def infllm_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor, *, block_size: int, n_init: int,
    n_local: int, topk: int, repr_topk: int, exec_chunk: int, scaling: float,
) -> tuple[torch.Tensor, list[list[int]]]:
    """InfLLM attention of one sequence from unrotated q (H, N, D), k and v (H, N, D) (one key head per query head),
    token i at position i. Returns the output (H, N, D) float64 and the blocks each chunk retrieved."""
    H, N, D = q.shape
    k0 = k.double()
    score = torch.zeros(H, N, dtype=torch.float64)  # attention each token received from local-window queries
    n_init_now = 0
    first_free = 0  # first token that is neither initial nor in a block
    block_of: dict[int, int] = {}
    blocks: list[list[list[int]]] = []  # representative token indices per block, per head
    out = torch.zeros(H, N, D, dtype=torch.float64)
    chosen = []
    for st in range(0, N, exec_chunk):
        ed = min(st + exec_chunk, N)
        q_far = rope(q[:, st:ed], n_local - 1, inv_freq)
        sel = set(infllm_block_selection_naive(q_far, k0, blocks, topk))
        chosen.append(sorted(sel))
        for s in range(st, ed):
            q_true = rope(q[:, s : s + 1], s, inv_freq)[:, 0]
            for h in range(H):
                logits, values, local_idx = [], [], []
                for j in range(s + 1):
                    if s - j < n_local:
                        kj = rope(k[h, j : j + 1], j, inv_freq)[0]
                        logits.append(float(q_true[h] @ kj) * scaling)
                        local_idx.append((len(logits) - 1, j))
                    elif j < n_init_now or j >= first_free or block_of[j] in sel:
                        logits.append(float(q_far[h, s - st] @ k0[h, j]) * scaling)
                    else:
                        continue
                    values.append(v[h, j].double())
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
                out[h, s] = sum(pi * vi for pi, vi in zip(p, values, strict=True))
                for li, j in local_idx:
                    score[h, j] += p[li]
        # Tokens beyond the window: the first n_init become initial tokens, the next ones blocks.
        remaining = ed - first_free
        if n_init_now < n_init and remaining > n_local:
            take = min(n_init - n_init_now, remaining - n_local)
            n_init_now += take
            first_free += take
            remaining -= take
        while remaining - block_size >= n_local:
            toks = list(range(first_free, first_free + block_size))
            reps = []
            for h in range(H):
                ranked = sorted(toks, key=lambda j: float(score[h, j]), reverse=True)
                reps.append(ranked[:repr_topk])
            for j in toks:
                block_of[j] = len(blocks)
            blocks.append(reps)
            first_free += block_size
            remaining -= block_size
    return out, chosen
