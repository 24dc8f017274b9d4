"""RULER runner tasks, multi-needle and lost-in-the-middle tasks, and the RULER summary of a report."""

import json

import pytest

from longkit.errors import EvalError
from longkit.eval import ruler
from longkit.eval.records import RecordWriter, load_records, sample_id
from longkit.eval.report import summarize
from longkit.eval.runner import EvalConfig, evaluate
from longkit.eval.tasks import TASKS, TaskContext, get_task
from longkit.eval.tasks.multi_needle import needle_depths


def test_rulers_tasks_are_registered():
    assert set(ruler.TASKS) | {"qa_1_synthetic", "qa_2_synthetic", "multi_needle", "lost_in_middle"} <= set(TASKS)
    task = get_task("niah_single_1")
    assert task.uses_depth is False and task.chat_default is True


def test_ruler_runner_task_builds_the_ruler_sample(tiny_llama):
    ctx = TaskContext(tiny_llama.tokenizer, seed=2, chat=True)
    task = get_task("niah_multivalue")
    s = task.build(ctx, 2048, None, 1)
    expected = ruler.generate("niah_multivalue", tiny_llama.tokenizer, 2048, 2, seed=2, chat=True)[1]
    assert s.answers == expected["outputs"] and s.max_new_tokens == 128
    assert len(s.prompt.input_ids) == expected["input_tokens"] <= 2048 - 128
    # string_match_all on RULER's post-processed prediction
    assert task.score("\n " + " ".join(s.answers[:2]) + "\x00", s.answers) == 50.0
    assert task.score(" ".join(s.answers).upper(), s.answers) == 100.0


def test_qa_runner_tasks_need_data_or_say_synthetic(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.delenv("LONGKIT_RULER_SQUAD", raising=False)
    with pytest.raises(EvalError, match=r"\$LONGKIT_RULER_SQUAD.*run 'qa_1_synthetic'"):
        get_task("qa_1")
    ctx = TaskContext(tiny_llama.tokenizer)
    syn = get_task("qa_1_synthetic")
    s = syn.build(ctx, 1024, None, 0)
    assert syn.score(f"It is {s.answers[0].lower()}.", s.answers) == 100.0
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"question": "Where is Paris?", "answers": [{"text": "France"}], "is_impossible": False}]}]}]}))  # fmt: skip
    monkeypatch.setenv("LONGKIT_RULER_SQUAD", str(squad))
    real = get_task("qa_1").build(ctx, 512, None, 0)
    assert real.answers == ["France"] and real.max_new_tokens == 32


def test_multi_needle_spreads_needles_from_the_start_depth(tiny_llama):
    assert needle_depths(0.2, 4) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    tok = tiny_llama.tokenizer
    task = get_task("multi_needle")
    ctx = TaskContext(tok, seed=1)
    s = task.build(ctx, 3000, 0.2, 0)
    text = tok.decode(s.prompt.input_ids)
    assert len(s.prompt.input_ids) == 3000 and len(s.answers) == 4 and len(set(s.answers)) == 4
    where = [text.index(v) / len(text) for v in s.answers]
    assert all(text.count(v) == 1 for v in s.answers)
    assert where == sorted(where) and 0.1 < where[0] < 0.3 and 0.65 < where[-1] < 0.9
    assert "What are all the special magic numbers for" in text
    assert task.score(" and ".join(s.answers[:3]), s.answers) == 75.0
    late = task.build(ctx, 3000, 0.8, 0)
    assert late.prompt.needle_start > s.prompt.needle_start
    with pytest.raises(EvalError, match="too short for multi_needle"):
        task.build(ctx, 300, 0.5, 0)


def test_lost_in_middle_moves_the_gold_document(tiny_llama):
    tok = tiny_llama.tokenizer
    task = get_task("lost_in_middle")
    ctx = TaskContext(tok, seed=0, chat=False)
    builds = {d: task.build(ctx, 3000, d, 0) for d in (0.0, 0.5, 1.0)}
    answers = {tuple(b.answers) for b in builds.values()}
    assert len(answers) == 1
    texts = {d: tok.decode(b.prompt.input_ids) for d, b in builds.items()}
    gold = builds[0.0].answers[0]
    docs = texts[0.0].count("Document [")
    assert docs >= 5 and all(t.count("Document [") == docs for t in texts.values())
    # the document holding the answer is first, middle, last
    position = {d: t[: t.index(gold)].count("Document [") for d, t in texts.items()}
    assert position == {0.0: 1, 0.5: round(0.5 * (docs - 1)) + 1, 1.0: docs}
    assert all(len(b.prompt.input_ids) <= 3000 for b in builds.values())
    assert texts[0.0].endswith("Answer:") and "\nQuestion: " in texts[0.0]
    more = task.build(ctx, 6000, 0.5, 0)
    assert tok.decode(more.prompt.input_ids).count("Document [") > docs
    assert task.score(f"The town of {gold}", [gold]) == 100.0


def test_runner_runs_and_resumes_ruler_tasks(tmp_path, tiny_llama):
    cfg = EvalConfig(model="tiny-llama", methods=["baseline"], tasks=["niah_single_1", "fwe", "multi_needle"],
                     lengths=[1024], depths=[0.5], samples=2, run_dir=str(tmp_path / "run"))  # fmt: skip
    run = evaluate(cfg, lm=tiny_llama, progress=False)
    records = load_records(run)
    assert sorted((r["task"], r["sample"]) for r in records) == [
        ("fwe", 0), ("fwe", 1), ("multi_needle", 0), ("multi_needle", 1), ("niah_single_1", 0), ("niah_single_1", 1)
    ]  # fmt: skip
    for r in records:
        assert r["score"] is not None and 0 <= r["score"] <= 100
        if r["task"] != "multi_needle":
            assert r["depth"] is None and r["n_tokens"] <= 1024
    seen = []
    evaluate(cfg, lm=tiny_llama, progress=False, on_record=seen.append)
    assert seen == []


def _record(method, task, length, score, sample=0):
    return {"id": sample_id(method, task, length, None, sample), "method": method, "task": task, "length": length,
            "depth": None, "sample": sample, "n_tokens": length, "score": score, "prediction": "", "answer": ["x"],
            "prefill_s": 0.1, "decode_s": 0.1, "new_tokens": 1, "peak_mem_bytes": 1, "kv_bytes": 1}  # fmt: skip


def test_report_ruler_summary(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    scores = {"niah_single_1": (100, 90), "vt": (80, 40), "qa_1_synthetic": (90, 70)}
    tasks = [*scores, "passkey"]
    (run / "run.json").write_text(json.dumps({"model": {"name": "m"}, "methods": ["baseline"], "tasks": tasks}))
    with RecordWriter(run) as w:
        for task, (a, b) in scores.items():
            w.write(_record("baseline", task, 4096, a))
            w.write(_record("baseline", task, 8192, b))
            w.write(_record("baseline", task, 8192, b, sample=1))
        w.write(_record("baseline", "passkey", 8192, 0))
    summary = summarize(run)
    r = summary["per_method"]["baseline"]["ruler"]
    assert r["tasks"] == ["niah_single_1", "vt", "qa_1_synthetic"]  # passkey is not a RULER task
    assert r["average"] == {4096: 90.0, 8192: pytest.approx(200 / 3)}
    assert r["effective_length"] == 4096 and r["complete"] is False
    assert r["synthetic_qa"] == ["qa_1_synthetic"]
    assert r["table"]["vt"] == {4096: 80.0, 8192: 40.0}
    pytest.importorskip("matplotlib")
    from longkit.eval.report import write_report

    page = write_report(run).read_text()
    assert "<h2>RULER</h2>" in page and "qa_1_synthetic: offline synthetic QA" in page
    assert "not all 13 RULER tasks ran" in page
