"""Training recipes: what a training run does to the model and its data, as typed, range-checked dataclasses.

A recipe is declared like a method (fields with :func:`longkit.registry.param`, ``@register_recipe("name")``) and is
listed by ``longkit methods --kind train``; the run itself (load the model, apply RoPE/attention methods through the
seam, pack the data, run transformers' ``Trainer``, save) lives above the seam in :mod:`longkit.runtime.train`.

Why recipes have their own registry (:data:`RECIPES`) rather than a fifth kind in ``REGISTRIES``: the method kinds
are things the seam *applies* to a loaded model and removes again (``apply(model) -> undo``, bit-identical after
removal, one field per kind in ``MethodSpec``, one row each in the conformance matrix). A recipe is never applied
to a model at inference time; it drives a run and composes *with* every method kind (a ``continual`` run with
``--rope yarn``). It shares the parameter machinery (``param``, ``check_params``, ``Registry``), not the verb.

The hooks a recipe may override are the seams the planned recipes need, each one file:

- ``continual``: only the defaults (full or LoRA fine-tuning at the target length);
- ``pose``: :meth:`Recipe.train_length` (a short window) and :meth:`Recipe.transform` (skip-wise position ids);
- ``longlora``: :meth:`Recipe.attention` (S²-Attn during training), LoRA with trainable embeddings and norms
  (:meth:`Recipe.extra_trainable`);
- a loss such as LongCE: :meth:`Recipe.compute_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longkit.errors import MethodError
from longkit.methods import Parametrised
from longkit.registry import Registry, param

#: Every training recipe by name. Not one of the method ``REGISTRIES`` (see the module doc).
RECIPES = Registry("train", "training recipe")

#: The ``loss`` settings: the model's own cross-entropy, or LongCE's long-context weighting.
LOSSES = ("ce", "longce")

#: ``lora_targets`` names -> the module names LoRA adapts (Llama, Qwen2/3, Mistral, SmolLM2 spell them alike).
LORA_TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
}


def register_recipe(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_recipe("continual")``; stamps the class's ``kind`` and ``name``."""

    def add(cls: type) -> type:
        cls.kind, cls.name = "train", name
        return RECIPES.add(name, cls)

    return add


def create_recipe(spec: str | Recipe, args: dict[str, Any] | None = None) -> Recipe:
    """A recipe from ``"continual:lora=true,lr=1e-4"`` (the CLI spelling), a name plus ``args``, or a built one."""
    from longkit.registry import split_spec

    if isinstance(spec, Recipe):
        if args:
            raise MethodError("recipe args given with an already-built recipe; set its fields instead")
        return spec
    name, spec_args = split_spec(spec)
    twice = sorted(set(spec_args) & set(args or {}))
    if twice:
        raise MethodError(f"training recipe '{name}': parameter {', '.join(map(repr, twice))} given twice")
    return RECIPES.create(name, {**spec_args, **(args or {})})


@dataclass
class Recipe(Parametrised):
    """Base of the training recipes: the optimiser settings and LoRA, shared by all.

    Parameters
    ----------
    lr: peak learning rate (AdamW), > 0.
    warmup_ratio: fraction of the steps with a linear warm-up, in [0, 1).
    weight_decay: AdamW weight decay, >= 0.
    batch_size: packed rows per optimiser step (per device), >= 1.
    grad_accum: micro-batches accumulated per step, >= 1.
    max_grad_norm: gradient clipping norm, > 0.
    lora: train LoRA adapters (peft) instead of all weights; merged into the saved model.
    lora_r, lora_alpha, lora_dropout: LoRA rank (>= 1), scale (> 0) and dropout ([0, 1)).
    lora_targets: which linear layers get adapters: attention (q/k/v/o) or all-linear.
    loss: the training loss: ce (the model's cross-entropy) or longce (LongCE, Fang et al. 2024: each token's
        cross-entropy weighted by how much the long context helps predict it; see :mod:`longkit.train.losses`).
    longce_short, longce_stride, longce_cap: LongCE's short context (>= 1 tokens; the reference's 4096), the
        targets scored per short-context forward (>= 1; the reference's 1024) and the weight cap (> 0; 5).
    ce_chunk: ``loss=ce`` through :func:`longkit.train.chunked_ce.chunked_ce` (>= 1: the LM head applied to
        this many scored positions at a time, from the final hidden states; the float32 logits of the whole row
        are never held), or 0: the model's own loss (every position's logits). Models whose head it does not
        reproduce (a LoRA-adapted head, logit scaling, FSDP shards) get their own loss whatever the setting.

    Cost of ``loss=longce``: one extra forward pass without gradient per ``longce_stride`` targets, each over
    ``longce_short + longce_stride`` tokens, i.e. ``ceil((T - short) / stride)`` forwards of ``short + stride``
    tokens for a row of ``T``. At T = 32K with the defaults: 28 forwards of 5K tokens, 4.4x the row's tokens in
    forward-only passes, on top of the step's forward + backward (about 3 forwards' worth): a step costs about
    2.5x a cross-entropy step in the linear layers (less in attention, whose short windows are cheap). Rows no
    longer than ``longce_short`` get weight 1 everywhere (plain cross-entropy) and no extra pass.
    """

    kind: ClassVar[str] = "train"
    name: ClassVar[str] = "?"
    paper: ClassVar[str] = ""
    #: The recipe extends the window, so the target length must be larger than the model's trained length.
    needs_longer_target: ClassVar[bool] = True

    lr: float = param(2e-5, gt=0.0, help="peak learning rate (AdamW)")
    warmup_ratio: float = param(0.1, ge=0.0, lt=1.0, help="fraction of steps with linear warm-up")
    weight_decay: float = param(0.0, ge=0.0, help="AdamW weight decay")
    batch_size: int = param(1, ge=1, help="packed rows per step (per device)")
    grad_accum: int = param(1, ge=1, help="micro-batches accumulated per step")
    max_grad_norm: float = param(1.0, gt=0.0, help="gradient clipping norm")
    lora: bool = param(False, help="train LoRA adapters (merged into the saved model)")
    lora_r: int = param(8, ge=1, help="LoRA rank")
    lora_alpha: float = param(16.0, gt=0.0, help="LoRA scale alpha")
    lora_dropout: float = param(0.0, ge=0.0, lt=1.0, help="LoRA dropout")
    lora_targets: str = param("attention", choices=tuple(LORA_TARGETS), help="layers that get LoRA adapters")
    loss: str = param("ce", choices=LOSSES, help="training loss: ce (cross-entropy) or longce (LongCE weighting)")
    longce_short: int = param(4096, ge=1, help="LongCE: tokens of the short context (its reference: 4096)")
    longce_stride: int = param(1024, ge=1, help="LongCE: targets scored per short-context forward")
    longce_cap: float = param(5.0, gt=0.0, help="LongCE: cap on a token's weight")
    ce_chunk: int = param(1024, ge=0, help="loss=ce: LM-head rows per chunk of the chunked cross-entropy (0: the "
                                           "model's own loss, every position's logits at once)")

    def fail(self, key: str, text: str) -> None:
        raise MethodError(f"training recipe '{self.name}': parameter '{key}' {text}")

    # ------------------------------------------------------------------------------------------- the hooks

    def check(self, *, window: int, target_length: int) -> None:
        """Raise a MethodError when this recipe cannot run for a model trained at ``window`` tokens."""
        if self.needs_longer_target and target_length <= window:
            raise MethodError(
                f"training recipe '{self.name}': parameter 'target_length' = {target_length} must be larger than "
                f"the model's trained window {window} (the recipe extends the context)"
            )

    def train_length(self, target_length: int) -> int:
        """The length of the packed rows the model is trained on (PoSE: a shorter window than the target)."""
        return target_length

    def attention(self) -> str | None:
        """An attention method spec applied during training only (LongLoRA: S²-Attn), or None."""
        return None

    def transform(self, row: dict[str, torch.Tensor], index: int, seed: int) -> dict[str, torch.Tensor]:
        """Row ``index`` of the packed data as the model sees it (PoSE rewrites ``position_ids``). Must depend only
        on (row, index, seed), so that a resumed run sees the same rows."""
        return row

    def extra_trainable(self) -> list[str]:
        """Module names trained in full besides the LoRA adapters (LongLoRA's embeddings and norms)."""
        return []

    def compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The training loss of one batch (a mean over its scored targets), or None for the model's own
        cross-entropy over ``labels``. ``loss=ce``: the chunked cross-entropy
        (:func:`longkit.train.chunked_ce.model_chunked_ce`, the same value and gradients without the whole row's
        float32 logits), or None with ``ce_chunk=0`` or a model whose head it does not reproduce.
        ``loss=longce``: :func:`longkit.train.losses.longce_loss`, with the short-context losses from one
        no-gradient pass per window (:func:`~longkit.train.losses.short_context_nll`, given the batch's other inputs
        so that each window keeps the documents' masks and positions); it needs every position's logits (each
        token's weight compares its long and short losses), so it keeps the model's head."""
        if self.loss == "ce":
            if not self.ce_chunk:
                return None
            from longkit.train.chunked_ce import model_chunked_ce

            return model_chunked_ce(model, inputs, chunk=self.ce_chunk)
        from longkit.train.losses import longce_loss, short_context_nll

        ids, labels = inputs["input_ids"], inputs["labels"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels") and isinstance(v, torch.Tensor)}
        short = short_context_nll(model, ids, trunc_len=self.longce_short, stride=self.longce_stride,
                                  inputs={**extra, "use_cache": False})
        logits = model(input_ids=ids, **extra, use_cache=False).logits
        return longce_loss(logits, labels, short, cap=self.longce_cap)

    def wrap(self, model: Any) -> Any:
        """The model to train: itself (full fine-tuning) or a peft LoRA model around it."""
        if not self.lora:
            return model
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MethodError(f"training recipe '{self.name}': lora=true needs peft: pip install 'longkit[train]'") from None
        config = LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=LORA_TARGETS[self.lora_targets],
                            modules_to_save=self.extra_trainable() or None, task_type="CAUSAL_LM",
                            # a tied model's trained embedding copy must stay the output layer too, or the saved
                            # model (which re-ties them on loading) would differ from the trained one
                            ensure_weight_tying=bool(self.extra_trainable())
                            and bool(getattr(model.config, "tie_word_embeddings", False)))
        try:
            return get_peft_model(model, config)
        except ValueError as err:
            raise MethodError(f"training recipe '{self.name}': parameter 'lora_targets' = {self.lora_targets!r} does "
                              f"not fit {type(model).__name__}: {str(err).splitlines()[0]}") from None

    # ------------------------------------------------------------------------------------------ description
