"""Tests of longkit.eval.report on small synthetic run directories (no model involved)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from longkit.errors import EvalError
from longkit.eval.records import RecordWriter, sample_id
from longkit.eval.report import summarize, write_report

pytest.importorskip("matplotlib")

LENGTHS = [2048, 4096, 8192, 12288]
BASE, YARN, ODD = "baseline", "rope=yarn:factor=2", "kv=<snap>&x"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(method, task, length, score=None, depth=None, sample=0, **fields):
    """A complete samples.jsonl record; cost fields default to plausible values."""
    base = {
        "id": sample_id(method, task, length, depth, sample),
        "method": method,
        "task": task,
        "length": length,
        "depth": depth,
        "sample": sample,
        "n_tokens": length,
        "score": score,
        "prediction": "",
        "answer": ["x"],
        "prefill_s": 0.5,
        "decode_s": 0.1,
        "new_tokens": 10,
        "peak_mem_bytes": 2**20,
        "kv_bytes": 2**20,
    }
    base.update(fields)
    return base


def make_run(run_dir: Path, records, methods=(BASE, YARN), tasks=("passkey", "needle", "perplexity")) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {
        "model": {"name": "TinyLM-135M", "source": "test", "dtype": "float32", "trained_length": 8192},
        "methods": list(methods),
        "tasks": list(tasks),
        "lengths": LENGTHS,
        "seed": 0,
        "versions": {"torch": "2.13.0", "longkit": "0.1.0"},
        "git_commit": "abc123",
        "hardware": "cpu",
        "started": "2025-01-01T00:00:00",
    }
    (run_dir / "run.json").write_text(json.dumps(run))
    with RecordWriter(run_dir) as writer:
        for r in records:
            writer.write(r)
    return run_dir


def passkey_curve(method, scores):
    return [record(method, "passkey", n, score=s) for n, s in zip(LENGTHS, scores, strict=True)]


@pytest.fixture
def scored_run(tmp_path):
    """baseline passes up to 8K, yarn everywhere, ODD nowhere (85.6 exactly does not pass); needle grids for two."""
    records = passkey_curve(YARN, [100, 100, 100, 100])  # yarn first: the order must still follow run.json
    records += passkey_curve(BASE, [100, 100, 100, 0])
    records += passkey_curve(ODD, [85.6, 85.6, 50, 0])
    for method, score in ((BASE, 100.0), (YARN, 100.0)):
        for n in LENGTHS:
            for depth in (0.0, 0.5, 1.0):
                records.append(record(method, "needle", n, score=score if n <= 8192 else 0.0, depth=depth))
    return make_run(tmp_path / "run", records, methods=(BASE, YARN, ODD))


def test_effective_lengths_follow_the_strict_threshold(scored_run):
    s = summarize(scored_run)
    assert s["methods"] == [BASE, YARN, ODD]
    assert s["tasks"] == ["passkey", "needle"]
    passkey = {m: s["per_method"][m]["tasks"]["passkey"]["effective_length"] for m in s["methods"]}
    assert passkey == {BASE: 8192, YARN: 12288, ODD: None}  # ODD's 85.6 is not strictly above 85.6
    # all scored tasks: yarn's needle fails at 12K, so its mean there is (100 + 0) / 2 = 50.
    assert s["per_method"][YARN]["all_tasks"]["mean_by_length"][12288] == 50
    assert s["per_method"][YARN]["all_tasks"]["effective_length"] == 8192
    assert s["per_method"][ODD]["all_tasks"]["effective_length"] is None
    # A lower threshold lets 85.6 pass.
    assert summarize(scored_run, threshold=85.0)["per_method"][ODD]["tasks"]["passkey"]["effective_length"] == 4096


def test_weighted_averages(scored_run):
    stats = summarize(scored_run)["per_method"][BASE]["tasks"]["passkey"]
    assert stats["wavg_inc"] == pytest.approx((1 + 2 + 3) * 100 / 10)  # the failing 12K weighs 4 of 10
    assert stats["wavg_dec"] == pytest.approx((4 + 3 + 2) * 100 / 10)
    assert stats["mean"] == 75


def test_mean_per_length_and_needle_grid_from_several_samples(tmp_path):
    records = [
        # 4K: depth 0 has three samples (100, 100, 40), depth 0.5 one sample (0).
        record(BASE, "needle", 4096, score=100, depth=0.0, sample=0),
        record(BASE, "needle", 4096, score=100, depth=0.0, sample=1),
        record(BASE, "needle", 4096, score=40, depth=0.0, sample=2),
        record(BASE, "needle", 4096, score=0, depth=0.5, sample=0),
        record(BASE, "needle", 8192, score=90, depth=0.5, sample=0),
        record(BASE, "needle", 8192, score=None, depth=0.0, sample=0),  # unscored: ignored
    ]
    s = summarize(make_run(tmp_path / "run", records))
    needle = s["per_method"][BASE]["tasks"]["needle"]
    assert needle["mean_by_length"] == {4096: pytest.approx(60.0), 8192: 90}  # mean over samples, not over cells
    assert needle["n_by_length"] == {4096: 4, 8192: 1}
    grid = s["per_method"][BASE]["needle_grid"]
    assert grid["depths"] == [0.0, 0.5]
    assert grid["lengths"] == [4096, 8192]
    assert grid["scores"] == [[pytest.approx(80.0), None], [0, 90]]


def test_perplexity_is_pooled_over_tokens(tmp_path):
    records = [
        record(YARN, "perplexity", 4096, nll_sum=100.0, n_targets=100, decode_s=0.0, new_tokens=0, sample=0),
        record(YARN, "perplexity", 4096, nll_sum=10.0, n_targets=1000, decode_s=0.0, new_tokens=0, sample=1),
        record(YARN, "perplexity", 8192, nll_sum=300.0, n_targets=100, decode_s=0.0, new_tokens=0, sample=0),
    ]
    s = summarize(make_run(tmp_path / "run", records))
    ppl = s["per_method"][YARN]["perplexity"]
    assert ppl["ppl_by_length"][4096] == pytest.approx(math.exp(110 / 1100))
    assert ppl["ppl_by_length"][4096] != pytest.approx((math.exp(1.0) + math.exp(0.01)) / 2)
    assert ppl["ppl_by_length"][8192] == pytest.approx(math.exp(3.0))
    assert ppl["n_targets_by_length"] == {4096: 1100, 8192: 100}
    assert s["tasks"] == []  # perplexity is not a scored task
    assert s["per_method"][YARN]["tasks"] == {}
    assert s["per_method"][YARN]["cost"]["overall"]["decode_s_per_token"] is None  # no generated tokens


def test_costs_use_medians_and_max(tmp_path):
    rows = [  # length, prefill_s, decode_s, new_tokens, peak_mem_bytes, kv_bytes
        (4096, 1.0, 1.0, 10, 5, 100),
        (4096, 2.0, 4.0, 20, None, 200),
        (4096, 30.0, 9.0, 10, 7, 900),
        (4096, 3.0, 0.0, 0, 3, 300),
        (8192, 8.0, 8.0, 10, 50, 800),
    ]
    keys = ("prefill_s", "decode_s", "new_tokens", "peak_mem_bytes", "kv_bytes")
    records = [
        record(BASE, "passkey", row[0], score=100, sample=i, **dict(zip(keys, row[1:], strict=True)))
        for i, row in enumerate(rows)
    ]
    cost = summarize(make_run(tmp_path / "run", records))["per_method"][BASE]["cost"]
    at4k = cost["by_length"][4096]
    assert at4k["prefill_s"] == pytest.approx(2.5)  # median of 1, 2, 3, 30 (the mean would be 9)
    assert at4k["decode_s_per_token"] == pytest.approx(0.2)  # median of 0.1, 0.2, 0.9; new_tokens=0 left out
    assert at4k["peak_mem_bytes"] == 7
    assert at4k["kv_bytes"] == pytest.approx(250)
    assert cost["by_length"][8192]["prefill_s"] == 8.0
    assert cost["overall"]["peak_mem_bytes"] == 50
    assert cost["overall"]["prefill_s"] == 3.0


def test_write_report_files_and_html(scored_run):
    path = write_report(scored_run)
    assert path == scored_run / "report.html"
    for name in ("needle_heatmap.png", "score_vs_length.png"):
        assert (scored_run / name).read_bytes()[:8] == PNG_MAGIC
    assert not (scored_run / "perplexity.png").exists()
    page = path.read_text()
    assert "TinyLM-135M" in page
    assert BASE in page and YARN in page
    assert "kv=&lt;snap&gt;&amp;x" in page and "<snap>" not in page
    assert "longest tested length whose mean score is strictly above 85.6, RULER&#x27;s threshold" in page
    assert "<td>8K</td>" in page and "<td>12K</td>" in page and "<td>none</td>" in page
    assert 'src="needle_heatmap.png"' in page and 'src="score_vs_length.png"' in page
    assert "perplexity.png" not in page
    saved = json.loads((scored_run / "summary.json").read_text())
    assert saved["per_method"][BASE]["tasks"]["passkey"]["effective_length"] == 8192
    assert saved["per_method"][BASE]["tasks"]["passkey"]["mean_by_length"]["12288"] == 0


def test_write_report_with_perplexity_into_another_dir(tmp_path):
    records = passkey_curve(BASE, [100, 90, 80, 10])
    records += [
        record(m, "perplexity", n, nll_sum=2.0 * n, n_targets=n, decode_s=0.0, new_tokens=0)
        for m in (BASE, YARN)
        for n in LENGTHS
    ]
    run_dir = make_run(tmp_path / "run", records)
    path = write_report(run_dir, out_dir=tmp_path / "out" / "report")
    assert path == tmp_path / "out" / "report" / "report.html"
    assert (path.parent / "perplexity.png").read_bytes()[:8] == PNG_MAGIC
    assert (path.parent / "score_vs_length.png").is_file()
    assert not (path.parent / "needle_heatmap.png").exists()  # no needle records
    assert not (run_dir / "report.html").exists()
    page = path.read_text()
    assert "<h2>Perplexity</h2>" in page and f"{math.exp(2.0):.2f}" in page


def test_empty_run_dir_raises(tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(EvalError, match="empty-run"):
        summarize(empty)
    with pytest.raises(EvalError, match="empty-run"):
        write_report(empty)


def test_missing_matplotlib_raises(scored_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(EvalError, match=r"pip install 'longkit\[eval\]'"):
        write_report(scored_run)
    assert not (scored_run / "report.html").exists()


def test_report_does_not_touch_pyplot(scored_run):
    # pyplot owns the global backend; the report must draw through the Figure API and never import it.
    if "matplotlib.pyplot" in sys.modules:
        pytest.skip("pyplot already imported by another test")
    write_report(scored_run)
    assert "matplotlib.pyplot" not in sys.modules


def test_several_runs_are_compared_side_by_side_in_one_report(tmp_path):
    first = make_run(tmp_path / "cpu", passkey_curve(BASE, [100, 100, 100, 0]), methods=(BASE,), tasks=("passkey",))
    second = make_run(
        tmp_path / "gpu", passkey_curve(BASE, [100, 0, 0, 0]) + passkey_curve(YARN, [100, 100, 100, 100]), tasks=("passkey",)
    )
    # Same model in both runs: methods are told apart by the run directory's name.
    path = write_report([first, second], out_dir=tmp_path / "both")
    saved = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert saved["methods"] == [f"cpu · {BASE}", f"gpu · {BASE}", f"gpu · {YARN}"]
    lengths = {m: saved["per_method"][m]["tasks"]["passkey"]["effective_length"] for m in saved["methods"]}
    assert lengths == {f"cpu · {BASE}": 8192, f"gpu · {BASE}": 2048, f"gpu · {YARN}": 12288}
    page = path.read_text()
    assert "Run 1:" in page and "Run 2:" in page and f"gpu · {YARN}" in page
    assert (tmp_path / "both" / "score_vs_length.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(EvalError, match="needs an output directory"):
        write_report([first, second])


def test_many_methods_with_long_labels_keep_their_plots_readable(tmp_path):
    # 23 methods (the RoPE grid's size) with labels up to 60 characters: the figures grow to hold their legends
    # instead of squeezing the axes to nothing, and line styles keep methods 1 and 11 apart.
    import warnings

    from longkit.eval import report

    methods = [BASE] + [f"rope=llama3:factor={i},original_max_position_embeddings=8192" for i in range(2, 24)]
    records = []
    for i, m in enumerate(methods):
        for n in LENGTHS:
            records.append(record(m, "passkey", n, score=100.0 * (i % 2), depth=0.5))
            records.append(record(m, "perplexity", n, nll_sum=float(n) * (2 + 0.01 * i), n_targets=n))
    run = make_run(tmp_path / "run", records, methods=methods, tasks=("passkey", "perplexity"))
    summary = summarize(run)
    mpl = report._matplotlib()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = report._plot_scores(mpl, summary, tmp_path / "scores.png")
        ppl = report._plot_perplexity(mpl, summary, tmp_path / "ppl.png")
    # every legend lies inside its figure (nothing cut off) and the axes keep a usable size
    for fig, legend in ((scores, scores.legends[0]), (ppl, ppl.axes[0].get_legend())):
        box, page = legend.get_window_extent(fig.canvas.get_renderer()), fig.bbox
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1
        assert fig.axes[0].get_window_extent().height > 150
    assert (tmp_path / "scores.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "ppl.png").read_bytes()[:8] == PNG_MAGIC
    assert report._line_style(mpl, 1) != report._line_style(mpl, 11)
    assert report._line_style(mpl, 1)["color"] == report._line_style(mpl, 11)["color"]


def test_failed_samples_are_counted_and_block_the_aggregates_they_would_bias(tmp_path):
    # passkey: 4K one of two samples failed; needle: every sample at 8K failed. A failed record has an error and
    # no score; without the count, the "all tasks" effective length would be computed from what is left.
    error = "HTTP 500 from http://x/v1/completions: boom"
    records = [
        record(BASE, "passkey", 2048, score=100),
        record(BASE, "passkey", 4096, score=100, sample=0),
        record(BASE, "passkey", 4096, error=error, attempts=4, sample=1),
        record(BASE, "needle", 2048, score=100, depth=0.5),
        record(BASE, "needle", 8192, error=error, attempts=4, depth=0.5, sample=0),
        record(BASE, "needle", 8192, error="timeout", attempts=4, depth=0.5, sample=1),
        *passkey_curve(YARN, [100, 100, 100, 100]),
    ]
    run = make_run(tmp_path / "run", records)
    s = summarize(run)
    assert s["failed"] == 3 and s["tasks"] == ["passkey", "needle"]
    base = s["per_method"][BASE]
    passkey, needle = base["tasks"]["passkey"], base["tasks"]["needle"]
    assert passkey["mean_by_length"] == {2048: 100, 4096: 100}  # the mean of the scored samples
    assert passkey["n_by_length"] == {2048: 1, 4096: 1} and passkey["failed_by_length"] == {2048: 0, 4096: 1}
    for stats in (passkey, base["all_tasks"]):
        assert stats["effective_length"] is None and stats["wavg_inc"] is None and stats["mean"] is None
    assert needle["failed"] == 2 and needle["mean_by_length"] == {2048: 100, 8192: None}
    # all tasks: no mean at a length where some task failed (it would be the mean of the others)
    assert base["all_tasks"]["mean_by_length"] == {2048: 100, 4096: None, 8192: None}
    assert base["all_tasks"]["failed"] == 3 and base["all_tasks"]["not_computed"].startswith(
        "not computed: 3 samples failed and were not scored")
    assert base["failed"] == 3 and base["failure_reasons"] == {error: 2, "timeout": 1}
    assert base["needle_grid"]["lengths"] == [2048]  # failed samples are not zeros in the heat-map
    # the method without failures is untouched
    assert s["per_method"][YARN]["failed"] == 0 and s["per_method"][YARN]["all_tasks"]["effective_length"] == 12288
    page = write_report(run).read_text()
    assert "<h2>Failed samples</h2>" in page and html_cell("100.0 (1 failed)", "fail") in page
    assert html_cell("n/a (2 failed)", "fail") in page and html_cell("n/a (3 failed)") in page
    assert f"<td>{error}</td>" in page
    saved = json.loads((run / "summary.json").read_text())
    assert saved["per_method"][BASE]["tasks"]["needle"]["failed_by_length"] == {"2048": 0, "8192": 2}


def test_a_run_without_failures_shows_no_failure_section(scored_run):
    page = write_report(scored_run).read_text()
    assert "Failed samples" not in page and "n/a (" not in page
    assert summarize(scored_run)["failed"] == 0


def html_cell(text, css=""):
    return f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>"
