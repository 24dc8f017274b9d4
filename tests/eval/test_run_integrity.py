"""A run directory never hands back a stale or damaged result (issue #23, items 3 and 4).

Interrupted evals (kill -9, Ctrl-C) resume to exactly the records of an uninterrupted run; a second eval into a
running directory fails at once; an eval whose inputs differ from the directory's (a setting, or the contents of a
file an option or method parameter names) is refused with one line naming the change, while new methods, tasks
and lengths may join; damaged samples.jsonl lines are repaired or quarantined with a warning naming them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
from longkit.cli import app
from longkit.errors import EvalError
from longkit.eval.records import (
    QUARANTINE_FILE,
    SAMPLES_FILE,
    load_records,
    load_run,
    read_jsonl,
    repair_records,
    scan_records,
)
from longkit.eval.rundir import LOCK_FILE, RunLock, run_identity
from longkit.eval.runner import EvalConfig, evaluate
from longkit.registry import REGISTRIES, params_of
from longkit.seam import MethodSpec

#: Fields that measure the machine, not the result: an interrupted run may differ from an uninterrupted one here.
TIMING = {"prefill_s", "decode_s", "peak_mem_bytes"}
#: The interrupted grid: 2 methods x 2 lengths x (passkey 2 depths + perplexity) x 6 samples = 72 records.
GRID = dict(model="tiny-llama", methods=["baseline", "rope=linear:factor=2"], tasks=["passkey", "perplexity"],
            lengths=[300, 400], depths=[0.25, 0.75], samples=6)
TOTAL = 72


def cli_args(run_dir) -> list[str]:
    return [sys.executable, "-m", "longkit.cli", "eval", "--model", "tiny-llama", "--rope", "linear:factor=2",
            "--task", "passkey", "--task", "perplexity", "--lengths", "300,400", "--depths", "0.25,0.75",
            "--samples", "6", "--no-report", "--out", str(run_dir)]


def lines_in(path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def small(tmp_path, name="run", **kw):
    base = dict(model="tiny-llama", methods=["baseline"], tasks=["passkey"], lengths=[300], depths=[0.5], samples=1,
                run_dir=str(tmp_path / name))
    return EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    """The records of the grid run without interruption, by id."""
    run = evaluate(EvalConfig(**GRID, run_dir=str(tmp_path_factory.mktemp("ref") / "run")), lm=tiny_llama,
                   progress=False)
    records = {r["id"]: r for r in load_records(run)}
    assert len(records) == TOTAL
    return records


def interrupt_at_half(run_dir, sig: int, tiny_llama) -> subprocess.Popen:
    """Start the grid as `longkit eval` in a subprocess and send ``sig`` once half of its records are written;
    while it runs, a second eval into its directory must fail at once."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    # The child starts with SIGINT at its default: a test run launched in the background by a non-interactive
    # shell (`cmd &`) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored, so Ctrl-C would not reach
    # the eval (seen: the CI run started with `... &` here got rc 0 from an eval that never saw the signal).
    proc = subprocess.Popen(cli_args(run_dir), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    path = run_dir / SAMPLES_FILE
    checked_lock = False
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        n = lines_in(path)
        if n >= 1 and not checked_lock:
            start = time.monotonic()
            with pytest.raises(EvalError, match=rf"in use by another longkit eval \(pid {proc.pid}\)"):
                evaluate(EvalConfig(**GRID, run_dir=str(run_dir)), lm=tiny_llama, progress=False)
            assert time.monotonic() - start < 2.0  # at once: no model load, no waiting
            checked_lock = True
        if n >= TOTAL // 2:
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert checked_lock, proc.stderr.read().decode()
    return proc


def resume_and_compare(run_dir, reference, tiny_llama, interrupted_at: int) -> dict:
    assert 0 < interrupted_at < TOTAL, f"not interrupted midway: {interrupted_at} of {TOTAL} records"
    evaluate(EvalConfig(**GRID, run_dir=str(run_dir)), lm=tiny_llama, progress=False)
    raw = [json.loads(line) for line in (run_dir / SAMPLES_FILE).read_bytes().splitlines()]
    ids = [r["id"] for r in raw]
    different = [r["id"] for r in raw if {k: v for k, v in r.items() if k not in TIMING}
                 != {k: v for k, v in reference[r["id"]].items() if k not in TIMING}]
    figures = {"interrupted_at": interrupted_at, "records": len(raw), "unique_ids": len(set(ids)),
               "duplicates": len(ids) - len(set(ids)), "differences": len(different)}
    print(figures)
    assert figures == {**figures, "records": TOTAL, "unique_ids": TOTAL, "duplicates": 0, "differences": 0}
    assert set(ids) == set(reference)
    assert not (run_dir / QUARANTINE_FILE).exists()
    return figures


def test_kill_9_at_half_resumes_exactly(tmp_path, reference, tiny_llama):
    run_dir = tmp_path / "run"
    proc = interrupt_at_half(run_dir, signal.SIGKILL, tiny_llama)
    assert proc.returncode == -signal.SIGKILL
    # The killed eval's lock went with it: the resume below takes it at once.
    resume_and_compare(run_dir, reference, tiny_llama, lines_in(run_dir / SAMPLES_FILE))
    meta = load_run(run_dir)
    assert len(meta["invocations"]) == 2 and meta["invocations"][0]["argv"][1:3] == ["eval", "--model"]


def test_sigint_stops_cleanly_and_resumes_exactly(tmp_path, reference, tiny_llama):
    run_dir = tmp_path / "run"
    proc = interrupt_at_half(run_dir, signal.SIGINT, tiny_llama)
    err = proc.stderr.read().decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    # Ctrl-C stops between two records: nothing torn.
    assert (run_dir / SAMPLES_FILE).read_bytes().endswith(b"\n")
    resume_and_compare(run_dir, reference, tiny_llama, lines_in(run_dir / SAMPLES_FILE))


def test_second_concurrent_eval_fails_at_once_and_a_dead_holders_lock_does_not_block(tmp_path, tiny_llama):
    cfg = small(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        with pytest.raises(EvalError, match=rf"in use by another longkit eval \(pid {os.getpid()}\); wait for it"):
            evaluate(cfg, lm=tiny_llama, progress=False)
        assert not (run_dir / SAMPLES_FILE).exists()
    finally:
        lock.release()
    # A killed eval leaves its lock file (and pid) behind, but not its flock.
    (run_dir / LOCK_FILE).write_text("999999")
    evaluate(cfg, lm=tiny_llama, progress=False)
    assert len(load_records(run_dir)) == 1


# --- stale results: a different input is refused, a larger grid joins -------------------------------------------


def refused(cfg, tiny_llama, match):
    """``cfg`` into an existing run directory is refused with one line naming ``match``, the records untouched."""
    path = Path(cfg.run_dir) / SAMPLES_FILE
    before = path.read_bytes()
    with pytest.raises(EvalError, match=match) as err:
        evaluate(cfg, lm=tiny_llama, progress=False)
    assert "\n" not in str(err.value) and "choose another --out" in str(err.value).lower()
    assert path.read_bytes() == before


def write_longrope(path, long_factor: float):
    path.write_text(json.dumps({"short_factor": [1.0] * 8, "long_factor": [long_factor] * 8}))


def test_edited_method_file_is_refused_and_gets_a_new_default_directory(tmp_path, tiny_llama):
    factors = tmp_path / "factors.json"
    write_longrope(factors, 2.0)
    method = f"rope=longrope:config={factors}"
    evaluate(small(tmp_path, methods=[method]), lm=tiny_llama, progress=False)
    default_before = small(tmp_path, methods=[method], run_dir=None).default_run_dir()
    write_longrope(factors, 4.0)  # the same label, other factors: the old records are stale
    refused(small(tmp_path, methods=[method]), tiny_llama,
            rf"holds a run whose rope=longrope:config=.* read '{factors}' \(rope.config\) with other contents \(sha256 ")
    assert small(tmp_path, methods=[method], run_dir=None).default_run_dir() != default_before
    write_longrope(factors, 2.0)  # restored: the run resumes (nothing left to compute)
    seen = []
    evaluate(small(tmp_path, methods=[method]), lm=tiny_llama, progress=False, on_record=seen.append)
    assert seen == []


def test_every_method_parameter_that_names_a_file_is_hashed(tmp_path):
    # Any text parameter whose help says it reads a file must be declared param(..., file=True), or an edit to
    # the file would leave a run's old results in place.
    flagged = set()
    for kind, reg in REGISTRIES.items():
        for name in reg:
            for info in params_of(reg.get(name)):
                reads_file = info.type.startswith("str") and "file" in info.help.lower()
                assert info.file == reads_file, (kind, name, info.name)
                flagged |= {f"{kind}={name}:{info.name}"} if info.file else set()
    assert flagged == {"rope=longrope:config", "attention=minference:config", "kv=duo_attention:heads"}
    path = tmp_path / "named.json"
    contents = {
        "kv=duo_attention:heads": ('{"0": [0]}', '{"0": [1]}'),
        "attention=minference:config": ('{"0": [{"pattern": "dense"}]}', '{"1": [{"pattern": "dense"}]}'),
        "rope=longrope:config": ('{"long_factor": [2.0]}', '{"long_factor": [4.0]}'),
    }
    for key, (before, after) in contents.items():
        spec, param = key.rsplit(":", 1)
        path.write_text(before)
        parsed = MethodSpec.parse(f"{spec}:{param}={path}")
        identity = run_identity(small(tmp_path), [parsed])["method_files"]
        entry = identity[parsed.label()][f"{spec.split('=')[0]}.{param}"]
        assert entry["path"] == str(path)
        path.write_text(after)
        again = run_identity(small(tmp_path), [parsed])["method_files"][parsed.label()]
        assert again[f"{spec.split('=')[0]}.{param}"]["sha256"] != entry["sha256"], key
    # Inline JSON (minference's default) names no file.
    assert run_identity(small(tmp_path), [MethodSpec.parse("attention=minference")])["method_files"] == {}


def test_edited_option_files_are_refused(tmp_path, tiny_llama):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("The sky was clear over the quiet harbour. " * 200)
    text = tmp_path / "ppl.txt"
    text.write_text("Numbers and letters go on and on here. " * 300)
    cfg = dict(tasks=["needle", "perplexity"], lengths=[480], haystack=str(hay), ppl_text=str(text))
    evaluate(small(tmp_path, **cfg), lm=tiny_llama, progress=False)
    (hay / "b.txt").write_text("Another document joins the haystack. " * 200)
    refused(small(tmp_path, **cfg), tiny_llama, rf"holds a run whose haystack '{hay}' had other contents \(sha256 ")
    (hay / "b.txt").unlink()
    text.write_text("A different text scores a different perplexity. " * 300)
    refused(small(tmp_path, **cfg), tiny_llama, rf"holds a run whose ppl_text '{text}' had other contents")
    # The suite data directory is an option naming a directory too.
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_text("{}\n")
    first = run_identity(EvalConfig(data_dir=str(data)), [])["data_dir"]["sha256"]
    (data / "qa.jsonl").write_text("{} \n")
    assert run_identity(EvalConfig(data_dir=str(data)), [])["data_dir"]["sha256"] != first


@pytest.mark.parametrize("change,match", [
    ({"prefill_chunk": 128}, "holds a run with prefill_chunk=None, not 128"),
    ({"seed": 3}, "holds a run with seed=0, not 3"),
    ({"dtype": "bfloat16"}, "holds a run with dtype='float32', not 'bfloat16'"),
    ({"ppl_chunk": 64}, "holds a run with ppl_chunk=512, not 64"),
    ({"model": "tiny-qwen2"}, "holds a run with model='tiny-llama', not 'tiny-qwen2'"),
])
def test_a_setting_that_changes_recorded_results_is_refused(tmp_path, tiny_llama, change, match):
    evaluate(small(tmp_path), lm=tiny_llama, progress=False)
    refused(small(tmp_path, **change), tiny_llama, match)


def test_more_methods_tasks_and_lengths_grow_the_run_and_keep_every_invocation(tmp_path, tiny_llama):
    evaluate(small(tmp_path), lm=tiny_llama, progress=False, argv=["longkit", "eval", "first"])
    first = {r["id"]: r for r in load_records(tmp_path / "run")}
    grown = small(tmp_path, methods=["baseline", "rope=linear:factor=2"], tasks=["passkey", "perplexity"],
                  lengths=[300, 350])
    seen = []
    evaluate(grown, lm=tiny_llama, progress=False, argv=["longkit", "eval", "second"], on_record=seen.append)
    assert len(seen) == 2 * 2 * 2 - 1  # everything but the first run's one record
    records = {r["id"]: r for r in load_records(tmp_path / "run")}
    assert len(records) == 8 and all(records[k] == v for k, v in first.items())
    meta = load_run(tmp_path / "run")
    assert meta["methods"] == ["baseline", "rope=linear:factor=2"] and meta["lengths"] == [300, 350]
    assert meta["tasks"] == ["passkey", "perplexity"]
    assert [i["argv"][-1] for i in meta["invocations"]] == ["first", "second"]
    assert meta["argv"][-1] == "first"  # the run's own fields are its first invocation's


def test_out_at_a_directory_that_is_not_a_run_is_refused(tmp_path, tiny_llama):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(EvalError, match=r"'run_dir' \(--out\): .*mine is an existing directory that is not a longkit "
                       r"run \(no run.json; holds notes.txt\)"):
        evaluate(small(tmp_path, name="mine"), lm=tiny_llama, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # an empty directory is a fine new run
    (tmp_path / "empty").mkdir()
    evaluate(small(tmp_path, name="empty"), lm=tiny_llama, progress=False)
    assert len(load_records(tmp_path / "empty")) == 1


def test_cli_refusal_is_one_error_line_exit_2(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "x").write_text("")
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--task", "passkey", "--lengths", "300",
                                   "--depths", "0.5", "--no-report", "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().startswith("error:") and "not a longkit run" in res.output


# --- damaged records ---------------------------------------------------------------------------------------------


@pytest.fixture
def done_run(tmp_path, tiny_llama):
    """A finished 6-record run and its lines."""
    cfg = small(tmp_path, lengths=[300, 400], depths=[0.25, 0.75], samples=1, tasks=["passkey", "perplexity"])
    run = evaluate(cfg, lm=tiny_llama, progress=False)
    lines = (run / SAMPLES_FILE).read_bytes().splitlines(keepends=True)
    assert len(lines) == 6
    return cfg, run, lines


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "longkit.eval.records"]


def test_torn_utf8_last_line_is_reported_then_truncated_on_resume(done_run, tiny_llama, caplog):
    cfg, run, lines = done_run
    # A write cut inside a multi-byte character: the last record's prediction holds one.
    last = json.dumps({**json.loads(lines[-1]), "prediction": "caf\u00e9 \u20ac"}, ensure_ascii=False).encode()
    cut = last.index("\u20ac".encode()) + 1
    (run / SAMPLES_FILE).write_bytes(b"".join(lines[:-1]) + last[:cut])
    caplog.set_level(logging.WARNING)
    assert len(load_records(run)) == 5  # the report reads around it
    assert any("last line 6 is incomplete" in w for w in warnings_of(caplog))
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    caplog.clear()
    seen = []
    evaluate(cfg, lm=tiny_llama, progress=False, on_record=seen.append)
    assert [r["id"] for r in seen] == [json.loads(lines[-1])["id"]]
    assert any("last line 6 was cut short by an interrupted write" in w and "not UTF-8" in w
               for w in warnings_of(caplog))
    assert len({r["id"] for r in load_records(run)}) == 6 and lines_in(run / SAMPLES_FILE) == 6


@pytest.mark.parametrize("damage,reason", [
    (lambda line: line[:40] + b"\x00\xff garbage" + line[40:], "not UTF-8"),
    (lambda line: line[:-10] + b"\n", "not JSON"),
    (lambda line: b"\x13\x37 noise \n", "not JSON"),
    (lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "length"}).encode() + b"\n",
     "missing field 'length'"),
    (lambda line: json.dumps({**json.loads(line), "length": "300"}).encode() + b"\n", "field 'length' is '300'"),
    (lambda line: json.dumps({**json.loads(line), "score": "high"}).encode() + b"\n", "field 'score' is 'high'"),
    (lambda line: b"[1, 2, 3]\n", "not a JSON object"),
])
def test_damaged_middle_line_is_named_by_the_report_and_quarantined_by_a_resume(done_run, tiny_llama, caplog,
                                                                              damage, reason):
    cfg, run, lines = done_run
    bad = damage(lines[2])
    (run / SAMPLES_FILE).write_bytes(b"".join(lines[:2]) + bad + b"".join(lines[3:]))
    caplog.set_level(logging.WARNING)
    # Read-only readers name it and go on: the report, the summary, `longkit report`.
    assert len(load_records(run)) == 5
    (warning,) = warnings_of(caplog)
    assert "1 damaged line(s) left out: line 3 (" in warning and reason in warning
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    caplog.clear()
    # A resume moves it aside (byte for byte), then recomputes that sample.
    seen = []
    evaluate(cfg, lm=tiny_llama, progress=False, on_record=seen.append)
    assert [r["id"] for r in seen] == [json.loads(lines[2])["id"]]
    (warning,) = warnings_of(caplog)
    assert f"moved to {QUARANTINE_FILE}: line 3 (" in warning
    (moved,) = list(read_jsonl(run / QUARANTINE_FILE))
    assert moved["line"] == 3 and reason in moved["reason"]
    assert moved["raw"].encode("utf-8", "surrogateescape") == bad.rstrip(b"\n")
    scan = scan_records(run)
    assert not scan.bad and not scan.torn and len(scan.entries) == 6
    assert len({r["id"] for r in load_records(run)}) == 6


def test_valid_last_record_missing_only_its_newline_is_kept(done_run):
    _, run, lines = done_run
    (run / SAMPLES_FILE).write_bytes(b"".join(lines)[:-1])
    repair_records(run)
    assert (run / SAMPLES_FILE).read_bytes() == b"".join(lines)


def test_damaged_run_json_is_a_clear_error(done_run, tiny_llama):
    cfg, run, _ = done_run
    (run / "run.json").write_text('{"config": {"model": "tiny-')
    with pytest.raises(EvalError, match=r"run.json is damaged"):
        evaluate(cfg, lm=tiny_llama, progress=False)
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 2 and "run.json is damaged" in res.output


def test_model_and_tokenizer_directories_are_fingerprinted_aliases_are_names(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("scratch")  # hidden: not part of the model
    ident = run_identity(EvalConfig(model=str(model), tokenizer=str(model)), [])
    assert ident["model"]["path"] == str(model) and ident["tokenizer"]["sha256"] == ident["model"]["sha256"]
    (model / ".cache" / "lock").write_text("other scratch")
    assert run_identity(EvalConfig(model=str(model)), [])["model"] == ident["model"]
    (model / "config.json").write_text('{"x": 1}')
    assert run_identity(EvalConfig(model=str(model)), [])["model"] != ident["model"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-llama").mkdir()
    assert run_identity(EvalConfig(model="tiny-llama"), [])["model"] == "tiny-llama"


def test_large_files_are_fingerprinted_by_samples_that_catch_a_change(tmp_path, monkeypatch):
    from longkit.eval import rundir

    monkeypatch.setattr(rundir, "FULL_HASH_BYTES", 64)
    monkeypatch.setattr(rundir, "_BLOCK", 16)
    path = tmp_path / "weights.bin"
    data = bytearray(range(200))
    seen = set()
    for offset in (None, 0, 100, 199):  # unchanged, then a byte changed at the start, middle, end
        changed = bytearray(data)
        if offset is not None:
            changed[offset] ^= 0xFF
        path.write_bytes(bytes(changed))
        seen.add(rundir.fingerprint(path))
    path.write_bytes(bytes(data) + b"x")  # one byte longer
    seen.add(rundir.fingerprint(path))
    assert len(seen) == 5
