"""The ``pose`` recipe: PoSE positional skip-wise training (Zhu et al. 2024) on short windows.

One file per recipe; named ``pose_recipe`` because :mod:`longkit.train.pose` is the sampler it uses (PoSE's
position-id rule, usable on its own), and the two sort next to each other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from longkit.errors import MethodError
from longkit.registry import param
from longkit.train.data import block_causal_mask
from longkit.train.pose import pose_sample
from longkit.train.recipes import Recipe, register_recipe

IGNORE_INDEX = -100


def row_documents(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the documents of one packed row: the packer restarts positions at 0 at every
    document (and at the padding block)."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        raise MethodError("pose: the row's position ids must start at 0 (a packed row of longkit.train.data)")
    return list(zip(starts, [*starts[1:], position_ids.shape[0]], strict=True))


@register_recipe("pose")
@dataclass
class Pose(Recipe):
    """PoSE: train on windows of ``window`` tokens whose position ids, split in two chunks with a random skip,
    span the target length; the attention cost is that of the window.

    The data are packed into rows of ``window`` tokens (a document longer than the window is cut into windows);
    every document of a row gets its own PoSE position ids from :func:`longkit.train.pose.pose_sample` (the
    official two-chunk rule: first chunk at 0, skip uniform in ``[0, target - L]`` for a document of ``L``
    tokens), drawn from a ``random.Random`` seeded by (run seed, row index), so a resumed run redraws the same
    ids. Each row carries an explicit block-causal mask (each document attends to itself only): the skip breaks
    the consecutive position ids from which transformers would otherwise infer the documents. The mask is
    (window x window) per row, which PoSE's short windows keep small.

    Packed documents vs the reference: the official code cuts one window per document and takes the second
    chunk's text from anywhere later in the document (up to 5 windows); here a window is a contiguous piece of
    a document, so the chunks' texts are adjacent. The position ids follow the rule exactly (the text gap is
    what differs). The RoPE method given with ``--rope`` (the paper: linear interpolation to the target; YaRN,
    NTK) is applied in training and written into the saved ``config.json``, as for every recipe.
    Based on https://arxiv.org/abs/2309.10400.

    Parameters: window: int >= 2, the training window L_c (default 2048), smaller than the target length; and
    those of every recipe (:class:`~longkit.train.recipes.Recipe`).
    """

    paper = "PoSE: Efficient Context Window Extension of LLMs via Positional Skip-wise Training (Zhu et al. ICLR 2024) https://arxiv.org/abs/2309.10400"
    window: int = param(2048, ge=2, help="training window L_c (tokens), smaller than the target length")

    def check(self, *, window: int, target_length: int) -> None:
        super().check(window=window, target_length=target_length)
        if self.window >= target_length:
            self.fail("window", f"= {self.window} must be smaller than 'target_length' = {target_length} (PoSE "
                                "trains short windows that simulate the target length)")

    def train_length(self, target_length: int) -> int:
        # transform() needs the target; the run calls this once, before building the rows.
        self._target = target_length
        return self.window

    def transform(self, row: dict[str, torch.Tensor], index: int, seed: int) -> dict[str, torch.Tensor]:
        target = getattr(self, "_target", None)
        if target is None:
            raise MethodError("pose: train_length(target_length) must be called before transform()")
        # A string seed: Python hashes it with SHA-512, the same in every process (PYTHONHASHSEED does not apply).
        rng = random.Random(f"pose:{seed}:{index}")
        old, labels = row["position_ids"], row["labels"]
        positions, doc = old.clone(), torch.empty_like(old)
        for d, (a, b) in enumerate(row_documents(old)):
            doc[a:b] = d
            # The padding block (no target) keeps its positions; it attends only to itself. So does a piece of an
            # answer-only document without a trained token (a prompt cut from its answer): with no target in it,
            # its positions cannot change the loss. The labels themselves are never moved: the window is the row's
            # own contiguous tokens, so each token keeps its label (answer-only mask included).
            if b - a >= 2 and bool((labels[a:b] != IGNORE_INDEX).any()):
                positions[a:b] = pose_sample(b - a, b - a, target, rng=rng).position_ids
        return {**row, "position_ids": positions, "attention_mask": block_causal_mask(doc)[0]}

    def compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        mask = inputs.get("attention_mask")
        config = getattr(model, "config", None)
        if mask is not None and mask.dtype == torch.bool and mask.ndim == 4 and _plain_causal(mask):
            # Every row is one document (a window cut from a single document: the common case): the block mask is
            # the plain causal mask, so pass an all-ones (batch, L) mask instead. It keeps transformers from
            # reading the skip as a document boundary, and lets sdpa run its causal flash kernel instead of the
            # masked (L x L) math path (2.8x the 2K step at 4K with the explicit mask, measured).
            inputs["attention_mask"] = torch.ones(mask.shape[0], mask.shape[-1], dtype=torch.long,
                                                  device=mask.device)
            mask = inputs["attention_mask"]
        if mask is not None and mask.dtype == torch.bool and getattr(config, "_attn_implementation", "") == "eager":
            # transformers' eager attention adds the mask to the scores: it needs the additive form
            inputs["attention_mask"] = torch.zeros(mask.shape, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min)
        return super().compute_loss(model, inputs)


def _plain_causal(mask: torch.Tensor) -> bool:
    """Whether a (batch, 1, L, L) boolean block mask is the plain causal mask in every row."""
    n = mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return bool((mask == causal).all())
