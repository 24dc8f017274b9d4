"""Chunked cross-entropy: the causal-LM loss computed from the final hidden states, chunk by chunk, so that the
(T x V) logits are never held at once (a 4,096-token row of a 49,152-token vocabulary: 800 MB in float32).

Only the positions whose target is scored go through the LM head (an answer-only row of 4,096 tokens with 25
targets projects 25 rows, not 4,096). They are projected ``chunk`` rows at a time; each chunk's logits give its
log-sum-exp and target logit in float32 and are freed. The gradient is computed in the same pass (the loss is a
sum of per-token terms, so its gradient w.r.t. a chunk's logits, ``softmax - onehot``, is known in the forward):
``grad_hidden = g @ W`` and ``grad_W += g^T @ h`` chunk by chunk, and the backward only scales them by the
incoming gradient. Three matmuls per chunk, as the plain head's forward + backward, and no recomputation.

The value is transformers' ``ForCausalLMLoss``: the shift (position t predicts ``labels[t + 1]``), targets equal
to ``ignore_index`` skipped, the sum over targets divided by ``num_items`` when given (the Trainer's count over a
whole accumulated step), else their mean. The logits are computed in the head's compute dtype (bfloat16 under
autocast, as the model's own head) and upcast to float32 before the softmax, as the model's loss does.

Based on the chunked / fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024, "Liger Kernel: Efficient
Triton Kernels for LLM Training", https://arxiv.org/abs/2410.10989) and Cut Cross-Entropy (Wijmans et al. 2024,
"Cut Your Losses in Large-Vocabulary Language Models", https://arxiv.org/abs/2411.09009).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from longkit.errors import MethodError, TrainError

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")
#: Config fields that rescale the logits after the head (Cohere's ``logit_scale``, Granite's ``logits_scaling``):
#: a model setting one to anything but 1 gets its own loss (:func:`model_chunked_ce` returns None).
LOGIT_SCALES = ("logit_scale", "logits_scaling")


def _fail(name: str, text: str) -> None:
    raise MethodError(f"chunked_ce: parameter '{name}' {text}")


def _head_params(head: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, torch.nn.Linear):
        return head.weight, head.bias
    if isinstance(head, torch.Tensor) and head.ndim == 2 and head.is_floating_point():
        return head, None
    _fail("head", f"must be a torch.nn.Linear or a float (V, D) weight tensor (got {type(head).__name__})")
    raise AssertionError


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Under autocast the model's head runs in the autocast dtype: so do the chunks (same logits, same speed).
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, V) float32 logits of the rows ``h`` (n, D) and, with a soft cap, ``tanh(raw / softcap)`` (its
    derivative needs it)."""
    z = torch.nn.functional.linear(h.to(dtype), w, b).float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``-log softmax(cap(h W^T + b))[target]``; gradients computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk, softcap, dtype):
        # rows (N, D), targets (N,); the chunk's logits (n, V) live only inside one iteration
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        autocast_off = torch.autocast(rows.device.type, enabled=False) if torch.is_autocast_enabled(
            rows.device.type) else contextlib.nullcontext()
        with autocast_off:
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=rows.device)
            grad_h = torch.empty_like(rows) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
            for a in range(0, rows.shape[0], chunk):
                h, tgt = rows[a:a + chunk], targets[a:a + chunk]
                z, t = _logits(h, w, b, softcap, dtype)
                lse = torch.logsumexp(z, dim=-1)
                # (n,) the chunk's losses: log-sum-exp minus the target's logit
                total += (lse - z.gather(1, tgt[:, None]).squeeze(1)).sum()
                if not (want_h or want_w or want_b):
                    continue
                # d loss / d logits = softmax - onehot (in place over z: the chunk's one (n, V) buffer)
                g = z.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), tgt] -= 1.0
                if t is not None:
                    # d (c tanh(x / c)) / dx = 1 - tanh(x / c)^2
                    g.mul_(1.0 - t * t)
                if want_b:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if want_h:
                    grad_h[a:a + chunk] = g @ w
                if want_w:
                    grad_w += (g.t() @ h.to(dtype)).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.have = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if have else None for have in ctx.have]
        out = [None if g is None else (g * grad_out).to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)]
        return (*out, None, None, None, None)


def chunked_ce(
    hidden: torch.Tensor,
    head: torch.nn.Linear | torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int = 1024,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy of ``labels`` from the final hidden states, the LM head applied ``chunk`` rows at a
    time to the scored positions only (see the module doc); equals transformers' loss on ``head(hidden)``.

    Parameters:
        hidden: (B, T, D) float, the final hidden states (after the model's last norm), T >= 2.
        head: the LM head, a ``torch.nn.Linear`` (D -> V, bias allowed) or its (V, D) weight.
        labels: (B, T) int; position t is trained to predict ``labels[:, t + 1]``; ``ignore_index`` marks targets
            not scored.
        chunk: int >= 1, rows of the head per chunk (memory: ``chunk x V`` float32 logits at a time).
        softcap: None, or a float > 0: logits ``softcap * tanh(logits / softcap)`` (Gemma's
            ``final_logit_softcapping``).
        ignore_index: int, the label of positions not scored (default -100).
        reduction: ``mean`` (over the scored targets; NaN when there is none, as transformers) or ``sum``.
        num_items: None, or the number of targets to divide the sum by (transformers' ``num_items_in_batch``);
            overrides ``reduction``.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or not hidden.is_floating_point():
        _fail("hidden", "must be a float tensor (B, T, D)")
    weight, bias = _head_params(head)
    if weight.shape[1] != hidden.shape[2]:
        _fail("head", f"must map the hidden size {hidden.shape[2]} to the vocabulary (got weight "
                      f"{tuple(weight.shape)})")
    if (not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2]
            or labels.dtype not in (torch.int64, torch.int32)):
        _fail("labels", f"must be an int tensor (B, T) = {tuple(hidden.shape[:2])}")
    if hidden.shape[1] < 2:
        _fail("hidden", f"needs T >= 2 positions (got T = {hidden.shape[1]})")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        _fail("chunk", f"must be an int >= 1 (got {chunk!r})")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, int | float)
                                or not softcap > 0 or softcap == float("inf")):
        _fail("softcap", f"must be None or a finite number > 0 (got {softcap!r})")
    if reduction not in REDUCTIONS:
        _fail("reduction", f"must be one of {', '.join(REDUCTIONS)} (got {reduction!r})")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _fail("ignore_index", f"must be an int (got {ignore_index!r})")
    # (B, T - 1): the target of each position, and whether it is scored
    target = labels[:, 1:].long()
    keep = target != ignore_index
    scored = target[keep]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= weight.shape[0]):
        _fail("labels", f"must hold token ids in [0, {weight.shape[0]}) or ignore_index = {ignore_index}")
    # (N, D): the hidden states of the N positions with a target
    rows = hidden[:, :-1][keep]
    total = _LinearCrossEntropy.apply(rows, weight, bias, scored, chunk,
                                      None if softcap is None else float(softcap), _compute_dtype(hidden, weight))
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(total.device)
        return total / num_items
    if reduction == "sum":
        return total
    return total / keep.sum()


# ---------------------------------------------------------------------------------------- a model's own head


def _active_head(head: Any) -> torch.nn.Linear | None:
    """The plain ``torch.nn.Linear`` that computes ``head``'s logits, or None. peft's ``ModulesToSaveWrapper`` (a
    trained copy of a tied embedding, LongLoRA's LoRA+) runs its active copy: that one."""
    if type(head).__name__ == "ModulesToSaveWrapper":
        names = list(getattr(head, "active_adapters", []) or [])
        if getattr(head, "disable_adapters", False) or not names:
            head = head.original_module
        elif names[0] in head.modules_to_save:
            head = head.modules_to_save[names[0]]
        else:
            return None
    # A subclass (a LoRA layer on the head, a quantised linear) computes something else than weight @ h: not ours.
    return head if type(head) is torch.nn.Linear else None


def _core(model: Any) -> Any:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        return model.module
    return model


def _sharded(model: Any, head: torch.nn.Linear) -> bool:
    fsdp = getattr(torch.distributed, "fsdp", None) if torch.distributed.is_available() else None
    kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None))
                  if k is not None)
    return (bool(kinds) and isinstance(model, kinds)) or type(head.weight).__name__ == "DTensor"


def head_of(model: Any) -> tuple[torch.nn.Linear, float | None] | None:
    """``(head, softcap)`` when :func:`chunked_ce` reproduces ``model``'s loss, else None (then the caller uses the
    model's own loss), with the reason in the comments below."""
    core = _core(model)
    get = getattr(core, "get_output_embeddings", None)
    head = _active_head(get()) if callable(get) else None
    # Not a plain Linear (a LoRA-adapted or custom head): its forward is not weight @ h + bias.
    if head is None:
        return None
    # FSDP: the head's weight is a shard (or a flat parameter) outside the forward; the model's loss gathers it.
    if _sharded(core, head):
        return None
    config = core.config.get_text_config() if hasattr(core.config, "get_text_config") else core.config
    # Logits rescaled after the head: the scaling is not implemented here.
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in LOGIT_SCALES):
        return None
    base = core.get_base_model() if hasattr(core, "get_base_model") else core
    # Without logits_to_keep the forward would compute the full logits anyway: no saving.
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    return head, getattr(config, "final_logit_softcapping", None)


@torch.no_grad()
def _check_last_position(model_logits: torch.Tensor, hidden: torch.Tensor, head: torch.nn.Linear,
                         softcap: float | None, model: Any) -> None:
    """The model's own logits at the last position equal ours from the same hidden state: the hidden state is the
    head's input and nothing else transforms the logits (a guard against models that do more than the checks in
    :func:`head_of` know about). Costs one (B, V) row of logits."""
    # (B, D) -> (B, V)
    dtype = _compute_dtype(hidden, head.weight)
    ours, _ = _logits(hidden, head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype), softcap,
                      dtype)
    theirs = model_logits.float()
    if not bool(torch.isfinite(theirs).all()):
        # A model whose weights went NaN: its loss is NaN either way, and the run's guard stops on it.
        return
    gap = float((ours - theirs).norm() / theirs.norm().clamp_min(1e-12))
    # bfloat16 rounds each logit to ~0.4%; a different input or a missing transform is off by far more
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if not gap <= tolerance:
        raise TrainError(f"loss=ce: the chunked cross-entropy does not reproduce {type(_core(model)).__name__}'s "
                         f"logits (relative gap {gap:.2g}); train with ce_chunk=0 (the model's own loss)")


def model_chunked_ce(model: Any, inputs: dict[str, Any], *, chunk: int = 1024, num_items: Any = None,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor | None:
    """The causal-LM loss of ``model`` on ``inputs`` (with ``labels``) through :func:`chunked_ce`: one forward for
    the final hidden states (``output_hidden_states``, and ``logits_to_keep=1`` so that the model's head projects
    one position), the head taken from ``get_output_embeddings()``. None when the model's head does not fit
    (:func:`head_of`): the caller then uses the model's own loss.

    Parameters: model: a transformers causal LM, possibly peft- or DDP-wrapped. inputs: its batch (``labels`` (B,
    T) and the forward's inputs). chunk, num_items, ignore_index: as :func:`chunked_ce`."""
    found = head_of(model)
    if found is None:
        return None
    head, softcap = found
    extra = {k: v for k, v in inputs.items() if k != "labels"}
    out = model(**extra, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    # transformers ties hidden_states[-1] to the last hidden state after the final norm: the head's input
    hidden = out.hidden_states[-1]
    _check_last_position(out.logits[:, -1], hidden[:, -1], head, softcap, model)
    return chunked_ce(hidden, head, inputs["labels"], chunk=chunk, softcap=softcap, ignore_index=ignore_index,
                      num_items=num_items)


__all__ = ["IGNORE_INDEX", "LOGIT_SCALES", "chunked_ce", "head_of", "model_chunked_ce"]
