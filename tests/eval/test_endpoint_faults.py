"""Fault injection against a local OpenAI-compatible server on 127.0.0.1: every transport failure is a recorded,
counted error (never a crash, never a score), a run with failed samples exits 1 and says so, and a resumed run
retries exactly the failed samples."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from longkit.cli import app
from longkit.errors import EvalError
from longkit.eval.backends import GenerationRequest, OpenAIBackend
from longkit.eval.records import SAMPLES_FILE, iter_records, load_records
from longkit.eval.report import summarize, write_report
from longkit.eval.runner import EvalConfig, evaluate

#: Read timeout of the tests: a stall of STALL_S is past it, so the test stays fast.
TIMEOUT = 0.3
STALL_S = 1.0


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a handler that reset its own connection on purpose is not a server error


class FaultServer:
    """Answers like a perfect reader (the pass key or magic number is in the prompt), with injected faults.

    A fault is chosen per request: ``fault_on`` maps a prompt marker to a fault; ``queue`` is a list of faults
    given to the next requests in turn (``None``: answer); ``models_fault`` is the fault of ``GET /models``.
    Faults: an HTTP status (int), ``"badjson"``, ``"truncated"``, ``"null"``, ``"nochoices"``, ``"stall"``,
    ``"reset"``, ``"retry_after"`` (429 with Retry-After: 0.2 once).
    """

    def __init__(self):
        self.requests: list[str] = []
        self.fault_on: dict[str, object] = {}
        self.queue: list[object] = []
        self.models_fault: object = None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload, headers=()):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._fault(server.models_fault, chat=False) or self._send(200, {"data": [{"id": "m"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                chat = self.path.endswith("/chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                with server.lock:
                    server.requests.append(prompt)
                    fault = next((f for marker, f in server.fault_on.items() if marker in prompt), None)
                    if fault is None and server.queue:
                        fault = server.queue.pop(0)
                if not self._fault(fault, chat):
                    answer = answer_for(prompt)
                    choice = {"message": {"role": "assistant", "content": answer}} if chat else {"text": answer}
                    self._send(200, {"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})

            def _fault(self, fault, chat) -> bool:
                if fault is None:
                    return False
                if isinstance(fault, int):
                    self._send(fault, {"error": {"message": f"injected {fault}"}})
                elif fault == "retry_after":
                    self._send(429, {"error": "slow down"}, headers=[("Retry-After", "0.2")])
                elif fault == "badjson":
                    self._send(200, b"<html>502 Bad Gateway</html>")
                elif fault == "truncated":
                    # Declares 1000 bytes, sends 20, closes: the body is shorter than its Content-Length.
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [{"text"')
                    self.close_connection = True
                elif fault == "null":
                    choice = {"message": {"role": "assistant", "content": None}} if chat else {"text": None}
                    self._send(200, {"choices": [{**choice, "finish_reason": "content_filter"}]})
                elif fault == "nochoices":
                    self._send(200, {"error": {"message": "model overloaded"}})
                elif fault == "stall":
                    time.sleep(STALL_S)
                    self._send(200, {"choices": [{"text": "too late"}]})
                elif fault == "reset":
                    # SO_LINGER 0: close() sends a TCP reset instead of an orderly end.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                else:
                    raise AssertionError(f"unknown fault {fault!r}")
                return True

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def count(self, marker: str) -> int:
        return sum(marker in p for p in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def answer_for(prompt: str) -> str:
    found = re.search(r"pass key is (\d+)", prompt) or re.search(r"magic numbers for \S+ is: (\d+)", prompt)
    return f" {found.group(1)}." if found else " I do not know."


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


# ----------------------------------------------------------------------------------------------- the backend

FAULTS = [  # fault, words of the error, attempts with retries=1 (transient faults are retried, others not)
    (500, "HTTP 500", 2),
    (503, "HTTP 503", 2),
    (401, "authentication failed (HTTP 401", 1),
    (403, "access denied (HTTP 403", 1),
    (404, "HTTP 404", 1),
    (400, "HTTP 400", 1),
    ("badjson", "invalid JSON body", 2),
    ("truncated", "response body cut short", 2),
    ("null", "= null, not text (finish_reason 'content_filter')", 1),
    ("nochoices", "no choices (error: {'message': 'model overloaded'})", 1),
    ("stall", f"no answer within {TIMEOUT:g} s", 2),
    ("reset", "connection error", 2),
]


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize(("fault", "words", "attempts"), FAULTS, ids=[str(f[0]) for f in FAULTS])
def test_every_transport_failure_is_an_error_never_a_crash_or_an_answer(server, fault, words, attempts, chat):
    server.fault_on = {"FAULT": fault}
    warnings: list[str] = []
    backend = OpenAIBackend(server.url, "m", retries=1, backoff=0.0, timeout=TIMEOUT, warn=warnings.append)
    request = (GenerationRequest(4, messages=[{"role": "user", "content": "FAULT"}], label="s-7") if chat
               else GenerationRequest(4, prompt="FAULT", label="s-7"))
    result = backend.generate(request)
    assert not result.ok and result.text == "" and words in result.error, result.error
    assert result.attempts == attempts and server.count("FAULT") == attempts
    suffix = " (after 2 attempts)" if attempts == 2 else ""
    assert result.error.endswith(suffix)
    # one warning line per retry, naming the sample and the error
    assert len(warnings) == attempts - 1
    assert all(w.startswith("warning: s-7: attempt 1/2 failed: ") and words in w for w in warnings)
    # the record of such a result is an error record: no score, the error and the attempts kept
    assert result.record_fields()["error"] == result.error and result.record_fields()["attempts"] == attempts


def test_a_transient_fault_then_success_is_an_answer(server):
    server.queue = ["truncated", "reset", 502]
    backend = OpenAIBackend(server.url, "m", retries=3, backoff=0.0, timeout=TIMEOUT, warn=lambda _: None)
    result = backend.generate(GenerationRequest(4, prompt="The pass key is 31337."))
    assert result.ok and result.text == " 31337." and result.attempts == 4


def test_retry_after_is_honoured(server):
    server.queue = ["retry_after"]
    warnings: list[str] = []
    backend = OpenAIBackend(server.url, "m", retries=1, backoff=0.0, warn=warnings.append)
    t0 = time.perf_counter()
    result = backend.generate(GenerationRequest(4, prompt="The pass key is 5."))
    assert result.ok and result.attempts == 2 and time.perf_counter() - t0 >= 0.2
    assert warnings == [f"warning: /completions: attempt 1/2 failed: HTTP 429 from {server.url}/completions: "
                        '{"error": "slow down"}; retrying in 0.2 s']


def test_many_faults_at_once_all_come_back(server):
    faults = ["truncated", "null", "reset", "badjson", "stall", 500, None, None]
    server.fault_on = {f"F{i}": f for i, f in enumerate(faults) if f is not None}
    backend = OpenAIBackend(server.url, "m", retries=0, timeout=TIMEOUT, concurrency=4)
    results = dict(backend.generate_many(GenerationRequest(4, prompt=f"F{i} The pass key is {i}.")
                                         for i in range(len(faults))))
    assert sorted(results) == list(range(len(faults)))
    assert [results[i].ok for i in range(len(faults))] == [f is None for f in faults]


def test_endpoint_check(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = OpenAIBackend(server.url, "m", timeout=TIMEOUT)
    backend.check()
    server.models_fault = 404  # a server without GET /models is still alive
    backend.check()
    server.models_fault = 401
    with pytest.raises(EvalError, match=r"authentication failed \(HTTP 401.*\$OPENAI_API_KEY is not set"):
        backend.check()
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    server.models_fault = 403
    with pytest.raises(EvalError, match=r"access denied \(HTTP 403.*\$OPENAI_API_KEY is set"):
        OpenAIBackend(server.url, "m").check()
    server.models_fault = "stall"
    with pytest.raises(EvalError, match=f"no answer to GET /models within {TIMEOUT:g} s"):
        backend.check()


def test_timeouts_default_short_and_are_checked():
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "m")
    assert backend.connect_timeout == 10.0 and backend.timeout == 300.0
    assert EvalConfig().timeout == 300.0 and EvalConfig().connect_timeout == 10.0
    with pytest.raises(EvalError, match="parameter 'connect_timeout' must be > 0 seconds"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", connect_timeout=0)
    with pytest.raises(EvalError, match="'connect_timeout' > 0"):
        EvalConfig(methods=["baseline"], backend="openai", base_url="http://x/v1", api_model="m",
                   tokenizer="tiny-llama", connect_timeout=-1).validate()


# ----------------------------------------------------------------------------------------------- a whole run

def config(server, tmp_path, **kw):
    base = dict(model="tiny-llama", methods=["baseline"], backend="openai", base_url=server.url, api_model="m",
                tokenizer="tiny-llama", tasks=["passkey"], lengths=[512], depths=[0.5], samples=6, retries=0,
                concurrency=1, timeout=TIMEOUT, run_dir=str(tmp_path / "run"))
    return EvalConfig(**{**base, **kw})


def test_run_survives_every_fault_records_errors_and_resume_retries_only_them(server, tmp_path):
    # Before: a truncated body raised out of the worker thread and aborted the run with 0 records.
    server.queue = ["truncated", "null", "reset", "badjson", "stall"]
    cfg = config(server, tmp_path)
    run = evaluate(cfg, progress=False)
    records = load_records(run)
    assert len(records) == 6
    failed = sorted((r for r in records if r.get("error")), key=lambda r: r["sample"])
    assert [r["sample"] for r in failed] == [0, 1, 2, 3, 4]  # concurrency 1: the faults hit samples in turn
    for r, words in zip(failed, ["cut short", "= null", "connection error", "invalid JSON", "no answer within"],
                        strict=True):
        assert words in r["error"] and r["score"] is None and r["prediction"] == "" and r["attempts"] == 1
    assert [r["score"] for r in records if not r.get("error")] == [100.0]
    assert summarize(run)["per_method"]["baseline"]["tasks"]["passkey"]["failed"] == 5
    # The rerun sends exactly the five failed samples again; their new records replace the error records.
    sent = len(server.requests)
    seen: list[dict] = []
    evaluate(cfg, progress=False, on_record=seen.append)
    assert sorted(r["sample"] for r in seen) == [0, 1, 2, 3, 4] and len(server.requests) == sent + 5
    assert all(r["score"] == 100.0 and "error" not in r for r in seen)
    assert all(r.get("error") is None for r in load_records(run))
    assert len(list(iter_records(run))) == 11  # the log keeps the failures: append-only
    stats = summarize(run)["per_method"]["baseline"]["tasks"]["passkey"]
    assert stats["failed"] == 0 and stats["effective_length"] == 512


def cli_args(server, tmp_path, *extra):
    return ["eval", "--backend", "openai", "--base-url", server.url, "--api-model", "m", "--tokenizer", "tiny-llama",
            "--task", "passkey", "--task", "needle", "--lengths", "512,640", "--depths", "0.5", "--samples", "2",
            "--retries", "0", "--concurrency", "1", "--out", str(tmp_path / "run"), *extra]


def test_cli_counts_failures_everywhere_and_exits_1(server, tmp_path):
    # Every needle prompt answers HTTP 500, and one passkey prompt: 5 of 8 samples fail.
    server.fault_on = {"magic numbers": 500}
    server.queue = [500]
    out = CliRunner().invoke(app, cli_args(server, tmp_path))
    assert out.exit_code == 1, out.output
    assert "Traceback" not in out.output and isinstance(out.exception, SystemExit)
    last = out.stderr.strip().splitlines()[-1]  # one line
    assert last.startswith("error: 5 samples failed and were not scored in passkey (1), needle (4); most frequent "
                           f"error: HTTP 500 from {server.url}/completions") and "--allow-failures" in last
    run = tmp_path / "run"
    records = load_records(run)
    assert len(records) == 8 and sum(r.get("error") is not None for r in records) == 5
    assert all(r["score"] is None and "HTTP 500" in r["error"] for r in records if r.get("error"))
    # the CLI table: the needle task (all failed) keeps its row, and no effective length over failed samples
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.stdout.splitlines() if line.count("│") > 4]
    assert rows == [["baseline", "passkey", "100", "100", "n/a (1 failed)", "1"],
                    ["baseline", "needle", "-", "-", "n/a (4 failed)", "4"],
                    ["baseline", "all", "-", "-", "n/a (5 failed)", "5"]]
    assert "warning: baseline|needle|640|0.5000|1: failed, not scored: HTTP 500" in out.stdout
    # summary.json: counts per task and method, no effective length, the reason
    summary = json.loads((run / "summary.json").read_text())
    pm = summary["per_method"]["baseline"]
    assert summary["failed"] == 5 and pm["failed"] == 5 and summary["tasks"] == ["passkey", "needle"]
    needle, passkey = pm["tasks"]["needle"], pm["tasks"]["passkey"]
    assert needle["failed"] == 4 and needle["failed_by_length"] == {"512": 2, "640": 2}
    assert needle["mean_by_length"] == {"512": None, "640": None} and needle["effective_length"] is None
    assert passkey["failed"] == 1 and passkey["effective_length"] is None and passkey["wavg_inc"] is None
    assert sorted(passkey["n_by_length"].values()) == [1, 2]  # the scored ones still show their means
    assert pm["all_tasks"]["effective_length"] is None and pm["all_tasks"]["failed"] == 5
    assert pm["all_tasks"]["not_computed"].startswith("not computed: 5 samples failed")
    assert list(pm["failure_reasons"].values()) == [5]
    # report.html: the failure column, the n/a cells and a section listing them
    page = (run / "report.html").read_text()
    assert "<h2>Failed samples</h2>" in page and "n/a (5 failed)" in page and "n/a (4 failed)" in page
    assert '<td class="fail">5</td>' in page and "HTTP 500" in page

    # Accepting the failures: exit 0; the rerun retried the 5 failed samples (the server still fails them).
    sent = len(server.requests)
    server.queue = [500]
    accepted = CliRunner().invoke(app, cli_args(server, tmp_path, "--allow-failures", "--no-report"))
    assert accepted.exit_code == 0, accepted.output
    assert len(server.requests) == sent + 5 and "n/a (5 failed)" in accepted.stdout

    # The server is fixed: the rerun sends only the 5 failed samples, everything is scored, exit 0.
    server.fault_on, sent = {}, len(server.requests)
    fixed = CliRunner().invoke(app, cli_args(server, tmp_path))
    assert fixed.exit_code == 0, fixed.output
    assert len(server.requests) == sent + 5 and "failed" not in fixed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["per_method"]["baseline"]["all_tasks"]["effective_length"] == 640
    assert "Failed samples" not in (run / "report.html").read_text()


def test_cli_prints_a_warning_per_retry_naming_the_sample(server, tmp_path):
    server.queue = [503]
    args = cli_args(server, tmp_path, "--no-report")
    args[args.index("--retries") + 1] = "1"
    out = CliRunner().invoke(app, [*args[:args.index("--task")], "--task", "passkey",
                                   *args[args.index("--lengths"):]])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert re.search(r"warning: baseline\|passkey\|512\|0\.5000\|\d: attempt 1/2 failed: HTTP 503 from "
                     rf"{re.escape(server.url)}/completions: .*; retrying in 1 s", text), text
    assert "Traceback" not in out.output


def test_cli_authentication_failure_at_start_exits_2(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "wrong")
    server.models_fault = 401
    out = CliRunner().invoke(app, cli_args(server, tmp_path, "--api-key-env", "MY_KEY"))
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "authentication failed (HTTP 401; the API key is read from --api-key-env, and $MY_KEY is set)" \
        in " ".join(out.output.split())
    assert server.requests == [] and not (tmp_path / "run" / SAMPLES_FILE).exists()


def test_report_of_a_run_whose_task_failed_entirely(tmp_path, server):
    server.fault_on = {"pass key": 401}
    run = evaluate(config(server, tmp_path, samples=2), progress=False)
    records = load_records(run)
    assert [r["attempts"] for r in records] == [1, 1]  # a 401 is not retried
    summary = summarize(run)
    passkey = summary["per_method"]["baseline"]["tasks"]["passkey"]
    assert summary["tasks"] == ["passkey"] and passkey["failed"] == 2 and passkey["mean_by_length"] == {512: None}
    page = write_report(run).read_text()
    assert "n/a (2 failed)" in page and "authentication failed" in page
