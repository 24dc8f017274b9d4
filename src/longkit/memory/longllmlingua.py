"""LongLLMLingua prompt compression (Jiang et al. 2024): a small causal LM (the compressor) ranks the context's
documents by how well each one predicts the question, keeps the best within a token budget, then drops the tokens
of the kept documents that the question makes least surprising, segment by segment.

Like retrieval (:mod:`longkit.memory.rag`), it changes the prompt, not the model: the eval runner builds the prompt
from :meth:`LongLLMLingua.retrieve` for tasks that expose (instruction, context, question); the instruction and the
question are never compressed.

The steps follow the official implementation (microsoft/LLMLingua, ``llmlingua/prompt_compressor.py``:
``compress_prompt`` with the LongLLMLingua settings of its README, ``condition_in_question="after_condition"``,
``rank_method="longllmlingua"``, ``reorder_context="sort"``, ``condition_compare=True``, ``context_budget="+100"``,
``dynamic_context_compression_ratio=0.3``, ``iterative_size=200``), and reproduce its ranking and kept tokens
(tests/fixtures/official/longllmlingua/):

1. Documents: the context's text cut at sentence and line ends into documents of about ``doc_tokens`` compressor
   tokens (the official code takes a list of documents; a task's context is one text).
2. Coarse: each document's score is the compressor's mean loss of the question followed by "We can get the answer
   to this question in the given documents." given the document (the paper's restrictive prompt); documents are
   taken best (lowest) first until the target plus ``context_budget`` tokens is used up (the document that crosses
   it included), and each kept one gets a ratio offset from ``+dynamic_ratio`` (best) to ``-dynamic_ratio``.
3. Fine: ``question + "\\n\\n" + kept documents`` (joined by blank lines) is compressed in segments of
   ``iterative_size`` tokens; each piece of a segment keeps the tokens whose contrastive score (loss without the
   question minus loss with it, ``condition_compare``; else the loss) is above the quantile that keeps the piece's
   ratio (target / context tokens plus the document's offset) of all scores computed so far. Later segments are
   scored given the already compressed ones (the compressor's KV cache), as in LLMLingua. When the kept text is
   longer than the compressor's positions, its first pass scores the first window only and later segments drop
   the oldest cache entries after the question and ``SINK_TOKENS`` more (the official "KV-Cache Compression").

Two details of the official code are kept for parity and are worth knowing: a token is kept or dropped by the score
of the token right after it (the loss vector is not shifted back onto its tokens), and the last segment, when the
remaining tokens no longer fill a whole ``iterative_size`` segment, is left uncompressed (so short contexts
compress less than the ratio asks; the excess is below ``iterative_size`` tokens).

Based on Jiang et al. 2024, LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via Prompt
Compression (https://arxiv.org/abs/2310.06839).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from longkit.errors import LongkitError, MethodError
from longkit.memory.base import PromptMemory
from longkit.registry import param, register

#: The paper's restrictive prompt, appended to the question when documents are ranked (official code, verbatim).
RESTRICTIVE_PROMPT = " We can get the answer to this question in the given documents."
#: Cache entries kept after the question when the fine stage evicts the compressor's KV cache (official
#: ``cache_bos_num``).
SINK_TOKENS = 10
#: Documents end at a sentence end followed by white space, or at a line break.
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class Compression:
    """What compression kept: the context's token ids (evaluated model's tokenizer) and how it went."""

    ids: list[int]
    #: The compressed context as text, and its compressor token ids (each document's kept tokens, in order).
    text: str
    kept_ids: list[int]
    #: Documents, their scores (mean question loss; lower ranks first), and the kept ones in prompt order.
    documents: list[str]
    scores: list[float]
    kept: list[int]
    #: Compressor tokens of the context before compression, and the fine stage's target.
    context_tokens: int
    target: float
    #: Tokens the compressor model processed (every forward pass's input).
    compressor_tokens: int
    seconds: float
    peak_mem_bytes: int | None = None

    def fields(self) -> dict[str, Any]:
        """The record's fields of this compression (besides the runner's common cost fields)."""
        return {"compress_s": round(self.seconds, 6), "compressed_tokens": len(self.ids),
                "documents": len(self.documents), "kept_documents": self.kept,
                "compressor_tokens": self.compressor_tokens, "memory_peak_mem_bytes": self.peak_mem_bytes}


def split_documents(text: str, count: Any, doc_tokens: int) -> list[str]:
    """``text`` cut at sentence and line ends into documents of at most ``doc_tokens`` tokens (``count(text)``),
    sentences packed greedily; a sentence longer than that is a document of its own. Surrounding white space is
    dropped (documents are joined by blank lines, as the official code joins its list)."""
    pieces, at = [], 0
    for m in _BOUNDARY.finditer(text):
        pieces.append(text[at:m.end()])
        at = m.end()
    pieces.append(text[at:])
    docs: list[str] = []
    current, size = "", 0
    for piece in pieces:
        n = count(piece)
        if current and size + n > doc_tokens:
            docs.append(current)
            current, size = "", 0
        current, size = current + piece, size + n
    docs.append(current)
    return [d.strip() for d in docs if d.strip()]


def keep_threshold(scores: torch.Tensor, ratio: float) -> float:
    """The score a token must exceed to be kept so that about ``ratio`` of ``scores`` is kept: the value at index
    ``int(n * ratio) - 1`` (clamped to the scores) of the scores in descending order; -inf keeps all at ratio 1."""
    if ratio == 1.0:
        return float("-inf")
    scores = scores[scores != 10000]  # the official code's marker of forced tokens (none here), excluded likewise
    k = max(0, min(len(scores) - 1, int(len(scores) * ratio) - 1))
    return scores.sort(descending=True).values[k].item()


def segment_plan(lengths: Sequence[int], target: float, size: int, offsets: Sequence[float]) -> list[list[tuple]]:
    """Per segment of ``size`` tokens, its pieces ``(tokens, keep ratio)`` by document: ``lengths`` are the kept
    documents' token counts (+2 each for the blank line that joins them, as the official estimate), a document's
    ratio is ``target / (sum + 1)`` plus its offset, clamped to [0, 1]."""
    tau = target / (sum(lengths) + 1)
    plan: list[list[tuple]] = []
    current: list[tuple] = []
    filled = 1  # the official count starts at 1
    for n, offset in zip(lengths, offsets, strict=True):
        ratio = max(min(1, tau + offset), 0)
        if filled + n < size:
            current.append((n, ratio))
            filled += n
            continue
        current.append((size - filled, ratio))
        plan.append(current)
        filled = filled + n - size
        if filled > size:
            plan.extend([[(size, ratio)]] * (filled // size))
            filled -= filled // size * size
        current = [(filled, ratio)] if filled else []
    if current:
        plan.append(current)
    return plan


def rank_offsets(n: int, spread: float) -> list[float]:
    """Ratio offsets of ``n`` documents in rank order: evenly from ``+spread`` (best) down to ``-spread``."""
    if n <= 1:
        return [0.0] * n
    return [i * (abs(spread) / (n - 1)) for i in range(-(n - 1), n, 2)][::-1]


_COMPRESSORS: dict[tuple[str, str], Any] = {}


class Compressor:
    """The compressor model and tokenizer, with the losses LongLLMLingua needs; counts the tokens it processes."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.window = int(model.config.max_position_embeddings)
        self.processed = 0

    @classmethod
    def load(cls, name: str, device: str) -> Compressor:
        """A model alias or local directory, loaded once per device: float32 on CPU, the checkpoint's dtype on CUDA
        (the official loader's choice)."""
        if (name, device) not in _COMPRESSORS:
            from longkit.models import load_model

            lm = load_model(name, dtype="float32" if device == "cpu" else "auto", device=device)
            _COMPRESSORS[name, device] = cls(lm.model, lm.tokenizer)
        return _COMPRESSORS[name, device]

    def encode(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def losses(self, ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Per-position loss of ``ids`` (position i: the loss of token i + 1) after ``cache``'s tokens, and the
        cache grown by ``ids``."""
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache()
        self.processed += ids.shape[0]
        # An all-ones mask over cache and input, as the official call passes (the same attention path).
        mask = torch.ones(1, cache.get_seq_length() + ids.shape[0], dtype=torch.long, device=self.device)
        with torch.no_grad():
            out = self.model(ids[None].to(self.device), attention_mask=mask, cache=cache, use_cache=True)
        logits = out.logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, ids[1:].to(self.device), reduction="none").cpu(), cache

    def question_loss(self, document: str, question: str) -> float:
        """Mean loss of ``question`` given ``document`` (both with the tokenizer's special tokens, as official)."""
        ids = self.encode(document + question, True)[: self.window]
        loss, _ = self.losses(torch.tensor(ids))
        return loss[len(self.encode(document, True)) - 1:].mean().item()


def _crop(cache: Any, n: int) -> Any:
    """A cache of the first ``n`` tokens of ``cache`` (rebuilt: ``DynamicCache.crop``'s meaning changed in 5.x)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[..., :n, :], layer.values[..., :n, :], i)
    return out


def fine_compress(comp: Compressor, prefix: str, docs: list[str], target: float, size: int, offsets: list[float],
                  compare: bool) -> tuple[list[int], int]:
    """The fine stage: the kept compressor token ids of ``"\\n\\n".join(docs)`` (``prefix`` conditions, then is
    dropped) and the number of prefix tokens. Mirrors the official ``iterative_compress_prompt``."""
    start = prefix_length(comp, prefix + "\n\n", docs[0])
    plan = segment_plan([len(comp.encode(d, False)) + 2 for d in docs], target, size, offsets)
    ids = torch.tensor(comp.encode("\n\n".join([prefix, *docs]), False))
    own = ids[start:]  # the documents without the question: the contrastive score's other side
    end = min(size + start, len(ids))
    loss = own_loss = cache = own_cache = None
    ready = own_ready = 0
    popped: list[torch.Tensor] = []
    step = 0
    while end <= len(ids) and step < len(plan):
        if end > comp.window and cache is not None:
            # Past the compressor's positions: the first `cut` tokens leave for the output, and the cache drops as
            # many after its first SINK_TOKENS + question entries (official "KV-Cache Compression").
            cut, sink = end - comp.window, min(SINK_TOKENS + start, comp.window)
            popped.append(ids[:cut])
            ids, cache = ids[cut:], _evict(cache, sink, cut)
            end, ready = end - cut, ready - cut
            if compare:
                own_ready -= cut
                own, own_cache = own[cut:], _evict(own_cache, min(sink, own_cache.get_seq_length() - cut), cut)
        # Losses up to `end`, given the cached (already compressed) tokens; the first pass scores the first window.
        if step == 0:
            new, cache = comp.losses(ids[: comp.window])
        else:
            new, cache = comp.losses(ids[ready:end], cache if ready else None)
        if len(new) == 0:
            break
        loss = new if loss is None else _place(loss, new, ready, end - 1)
        cache = _crop(cache, end - size) if step else None
        if compare:
            if step == 0:
                new, own_cache = comp.losses(own[: comp.window])
            else:
                new, own_cache = comp.losses(own[own_ready:end - start], own_cache if own_ready else None)
            own_loss = new if own_loss is None else _place(own_loss, new, own_ready, end - start - 1)
            own_cache = _crop(own_cache, end - size - start) if step else None
            own_ready = end - start - size if step else 0
        ready = end - size if step else 0
        for piece, ratio in plan[step]:
            scores = own_loss[: len(loss) - start] - loss[start:] if compare else loss
            threshold = keep_threshold(scores, ratio)
            w_end = end - size + piece
            keep = torch.cat([loss[:start] > 0, scores > threshold, loss[:1] > 0]) if compare else \
                torch.cat([loss > threshold, loss[:1] > 0])
            # Only this piece's window [w_end - piece, w_end) is compressed; keep[i] decides token i.
            keep[w_end:] = True
            keep[: w_end - piece] = True
            loss = loss[keep[:-1]]
            if compare:
                if len(keep) < len(own_loss) + start + 1:
                    keep = torch.cat([keep, torch.ones(len(own_loss) + start + 1 - len(keep), dtype=torch.bool)])
                own_loss = own_loss[keep[start:-1]]
            keep = torch.cat([keep, torch.ones(max(0, len(ids) - len(keep)), dtype=torch.bool)])[: len(ids)]
            ids = ids[keep]
            if compare:
                own = own[keep[start:]]
            end = w_end - int((~keep[:w_end]).sum()) + size
        step += 1
    return torch.cat([*popped, ids])[start:].tolist(), start


def _evict(cache: Any, keep: int, n: int) -> Any:
    """A cache without the ``n`` entries after its first ``keep``."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(torch.cat([layer.keys[..., :keep, :], layer.keys[..., keep + n:, :]], dim=-2),
                   torch.cat([layer.values[..., :keep, :], layer.values[..., keep + n:, :]], dim=-2), i)
    return out


def _place(past: torch.Tensor, new: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``past`` with ``new`` written over ``[lo, hi)``, grown with zeros first when it is shorter (official)."""
    if hi > len(past):
        past = torch.cat([past, torch.zeros_like(new)[: hi - len(past)]])
    past[lo:hi] = new
    return past


def prefix_length(comp: Compressor, prefix: str, text: str) -> int:
    """Tokens of ``prefix`` when it is tokenized in front of ``text``: the first cut of ``prefix + text[:100]``'s
    tokens that decodes to ``prefix`` (official ``get_prefix_length``)."""
    full = comp.encode(prefix + text[:100], False)
    first = max(len(comp.encode(prefix, False)) - 3, 1)
    cuts = range(first, len(full))
    # No cut decodes to the prefix (a token spans the boundary): the official loop ends on its last cut.
    return next((i for i in cuts if comp.tokenizer.decode(full[:i]) == prefix), cuts[-1] if cuts else first)


@register("memory", "longllmlingua")
@dataclass
class LongLLMLingua(PromptMemory):
    """Question-aware coarse-to-fine prompt compression with a small causal LM, to 1/ratio of the context.

    Based on Jiang et al. 2024, LongLLMLingua (https://arxiv.org/abs/2310.06839); official code: microsoft/LLMLingua.
    """

    ratio: float = param(4.0, gt=1.0, le=1000.0, help="compression factor: keep about 1/ratio of the context")
    compressor: str = param("smollm2-135m", help="compressor model: an alias (smollm2-135m, tiny-llama) or local dir")
    doc_tokens: int = param(128, ge=8, le=100_000, help="compressor tokens per document (sentences packed)")
    iterative_size: int = param(200, ge=8, le=100_000, help="tokens per segment of the fine stage")
    dynamic_ratio: float = param(0.3, ge=0.0, le=1.0, help="keep-ratio offset, +best .. -worst kept document")
    context_budget: int = param(100, ge=0, le=1_000_000, help="tokens over the target the coarse stage may keep")
    reorder: str = param("sort", choices=("sort", "original"), help="kept documents by rank (sort) or in order")
    condition_compare: bool = param(True, help="contrastive score (loss without minus with the question)")
    device: str = param("auto", choices=("auto", "cpu", "cuda"), help="compressor device (auto: cuda if present)")

    paper: ClassVar[str] = "Jiang et al. 2024, LongLLMLingua (https://arxiv.org/abs/2310.06839)"
    shown: ClassVar[tuple[str, ...]] = ("ratio", "compressor")
    #: The compressor, once loaded (tests may set one).
    _compressor: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.device == "cuda" and not torch.cuda.is_available():
            self.fail("device", "= 'cuda' but no CUDA device is available; use device=cpu or auto")
        from longkit.models import check_source

        try:
            # Refused here, before any sample runs, rather than at the first compression.
            check_source(self.compressor)
        except LongkitError as err:
            self.fail("compressor", f"= {self.compressor!r}: {err}")

    def work_device(self) -> str:
        return "cuda" if self.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if self.device == "auto" else self.device)

    def load(self) -> Compressor:
        if self._compressor is None:
            self._compressor = Compressor.load(self.compressor, self.work_device())
        return self._compressor

    def compress(self, context: str, question: str) -> tuple[str, dict[str, Any]]:
        """The compressed ``context`` (text) for ``question`` and what it took (see :class:`Compression`)."""
        if not question.strip():
            raise MethodError(f"memory method '{self.name}' needs a question to compress with; the task gave none")
        comp = self.load()
        docs = split_documents(context, lambda t: len(comp.encode(t, False)), self.doc_tokens)
        if not docs:
            raise MethodError(f"memory method '{self.name}' got an empty context to compress")
        n_context = len(comp.encode(context, False))
        text, info = self.compress_documents(docs, question, n_context / self.ratio)
        return text, {**info, "context_tokens": n_context}

    def compress_documents(self, docs: list[str], question: str, target: float) -> tuple[str, dict[str, Any]]:
        """The coarse and fine stages on ``docs`` for ``question``, to about ``target`` compressor tokens (the
        official ``compress_prompt(docs, question=question, target_token=target)`` with this method's settings):
        the compressed text and what it took."""
        comp = self.load()
        before = comp.processed
        scores = [comp.question_loss(d, question + RESTRICTIVE_PROMPT) for d in docs]
        kept = self.select(scores, [len(comp.encode(d, True)) for d in docs], target)
        offsets = dict(zip(sorted(kept, key=lambda i: (scores[i], i)), rank_offsets(len(kept), self.dynamic_ratio),
                           strict=True))
        prefix = self.fit_prefix(comp, question)
        kept_ids, _ = fine_compress(comp, prefix, [docs[i] for i in kept], target, self.iterative_size,
                                    [offsets[i] for i in kept], self.condition_compare)
        text = comp.tokenizer.decode(kept_ids).replace("<s> ", "").replace("<s>", "")
        return text, {"kept_ids": kept_ids, "documents": docs, "scores": scores, "kept": kept, "target": target,
                      "compressor_tokens": comp.processed - before}

    def select(self, scores: list[float], sizes: list[int], target: float) -> list[int]:
        """The coarse stage: documents by ascending score (ties: earlier first), taken while the budget of
        ``target + context_budget`` tokens lasts, the one that crosses it included; in rank order (``sort``) or
        document order (``original``). A single document is kept as it is (official)."""
        if len(scores) == 1:
            return [0]
        order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        budget = target + self.context_budget
        kept = []
        for i in order:
            budget -= sizes[i]
            kept.append(i)
            if budget < 0:
                break
        return kept if self.reorder == "sort" else sorted(kept)

    def fit_prefix(self, comp: Compressor, question: str) -> str:
        """The question as the fine stage's condition, its middle cut (first 100 tokens and the end kept) when it
        and two segments would not fit the compressor's positions (official)."""
        if len(comp.encode(question + "\n\n", True)) + 2 * self.iterative_size <= comp.window:
            return question
        ids = comp.encode(question, False)
        return comp.tokenizer.decode(ids[:100] + ids[len(ids) - comp.window + 2 + 100 + 2 * self.iterative_size:])

    def retrieve(self, tokenizer: Any, context_ids: Sequence[int], query: str) -> Compression:
        """The compressed context of ``context_ids`` (``tokenizer``'s ids) for ``query``, as ``tokenizer``'s ids."""
        start = time.perf_counter()
        context = tokenizer.decode(list(context_ids), skip_special_tokens=True)
        text, info = self.compress(context, query)
        ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
        return Compression(ids, text, seconds=time.perf_counter() - start, **info)
