"""The local Hugging Face model, under whatever longkit methods are applied (greedy decoding)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from longkit.errors import EvalError
from longkit.eval.backends.base import GenerationRequest, GenerationResult, NLLRequest
from longkit.memory.windows import ParallelWindows
from longkit.runtime.generate import greedy_generate
from longkit.runtime.windows import parallel_generate


class HFBackend:
    """Greedy generation with a loaded model inside ``longkit.apply(...)``: the runner's generation path.

    ``applied`` is the handle from :func:`longkit.apply` (its ``new_cache()`` gives each request a fresh cache
    of the applied KV method). Chat messages go through the tokenizer's chat template; plain text is tokenized
    with the tokenizer's special tokens (a BOS where the model uses one). Perplexity windows are scored with
    ``ppl_chunk`` tokens per forward under a KV method (None: the perplexity task's default).
    """

    name = "hf"

    def __init__(self, lm: Any, applied: Any, prefill_chunk: int | None = None, ppl_chunk: int | None = None):
        self.lm = lm
        self.applied = applied
        self.prefill_chunk = prefill_chunk
        self.ppl_chunk = ppl_chunk
        tok = lm.tokenizer
        eos = {
            i for i in (tok.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)) if i is not None
        }
        self.eos = {j for i in eos for j in (i if isinstance(i, list) else [i])}

    def input_ids(self, request: GenerationRequest) -> list[int]:
        tok = self.lm.tokenizer
        if request.input_ids is not None:
            return list(request.input_ids)
        if request.messages is not None:
            ids = tok.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
            # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return tok(request.prompt).input_ids

    def generate(self, request: GenerationRequest) -> GenerationResult:
        tok = self.lm.tokenizer
        ids = self.input_ids(request)
        eos = set(self.eos)
        if request.stop_newline:
            # LongBench samsum: the last id of "\n" joins the EOS ids.
            eos.add(tok.encode("\n", add_special_tokens=False)[-1])
        if request.windows is not None:
            return self._windowed(request, eos)
        memory = getattr(getattr(self.applied, "spec", None), "memory", None)
        gen = greedy_generate(
            self.lm.model, ids, request.max_new_tokens, self.applied.new_cache(), eos, prefill_chunk=self.prefill_chunk,
            last_token_alone=bool(getattr(memory, "prefill_last_token_alone", False)),
        )
        text = tok.decode(gen.tokens, skip_special_tokens=True)
        return GenerationResult(
            text=text,
            prompt_tokens=len(ids),
            completion_tokens=len(gen.tokens),
            stats=_cost(gen),
        )

    def _windowed(self, request: GenerationRequest, eos: set[int]) -> GenerationResult:
        """A prompt read in parallel windows by the applied memory method (PCW, NBCE), with its cost fields."""
        method = self.applied.spec.memory
        if not isinstance(method, ParallelWindows):
            raise EvalError("a windowed prompt needs a parallel-window memory method (pcw, nbce) applied; "
                            f"got memory={getattr(method, 'name', None)}")
        gen = parallel_generate(self.lm.model, method, request.windows, request.max_new_tokens, eos,
                                self.applied.new_cache)
        return GenerationResult(
            text=self.lm.tokenizer.decode(gen.tokens, skip_special_tokens=True),
            prompt_tokens=len(request.windows.ids),
            completion_tokens=len(gen.tokens),
            stats={
                **_cost(gen),
                "tokens_processed": gen.tokens_processed,
                "context_tokens": len(request.windows.context),
                "windows": len(gen.window_sizes),
                "window_tokens": max(gen.window_sizes),
            },
        )

    def nll(self, request: NLLRequest) -> dict[str, Any]:
        # Lazy: the perplexity task builds its requests with this module's request types.
        from longkit.eval.tasks.perplexity import DEFAULT_PPL_CHUNK, Perplexity

        # One forward, or chunks against the compressed cache when a KV method is applied (ppl_protocol says which).
        return Perplexity.nll(self.lm.model, request.input_ids, request.first_target, self.applied,
                              self.ppl_chunk or DEFAULT_PPL_CHUNK)

    def generate_many(self, requests: Iterable[GenerationRequest | NLLRequest]) -> Iterator[tuple[int, Any]]:
        for index, request in enumerate(requests):
            yield index, request.send(self)


def _cost(gen: Any) -> dict[str, Any]:
    """The cost fields of a greedy generation (plain or windowed) in a record."""
    cost = {"prefill_s": round(gen.prefill_s, 4), "decode_s": round(gen.decode_s, 4), "new_tokens": len(gen.tokens),
            "peak_mem_bytes": gen.peak_mem_bytes, "kv_bytes": gen.kv_bytes}
    working = getattr(gen, "working_set_bytes", None)
    return cost if working is None else {**cost, "working_set_bytes": working}
