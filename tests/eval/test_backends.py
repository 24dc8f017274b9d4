"""The OpenAI-compatible backend against a real local HTTP server (started here), incl. retries, errors,
timeouts, the concurrency limit, and suite / task runs through the runner and the CLI."""

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from conftest import FIXTURES
from longkit.cli import app
from longkit.errors import EvalError
from longkit.eval.backends import GenerationRequest, NLLRequest, OpenAIBackend
from longkit.eval.records import load_records
from longkit.eval.runner import EvalConfig, evaluate

FIX = FIXTURES / "suites"


class Server:
    """A tiny OpenAI-compatible server: answers from the prompt, with injectable failures."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.flaky_left = 0
        self.fail_on: str | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                # A request stops counting as in flight before its answer goes out: once the client has the answer
                # it may send the next one, and counting until after the write would see a third in flight.
                if getattr(self, "_counted", False):
                    self._counted = False
                    with server.lock:
                        server.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "m"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, **body})
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self._counted = True
                try:
                    self._answer(body)
                finally:
                    if self._counted:  # no answer was sent (e.g. a dropped connection)
                        self._counted = False
                        with server.lock:
                            server.in_flight -= 1

            def _answer(self, body):
                chat = self.path.endswith("/chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                if "SLOW" in prompt:
                    time.sleep(1.0)
                if "BUSY" in prompt:
                    time.sleep(0.15)
                if "BADREQ" in prompt:
                    return self._send(400, {"error": "bad request"})
                if "ALWAYSFAIL" in prompt or (server.fail_on and server.fail_on in prompt):
                    return self._send(500, {"error": "boom"})
                if "FLAKY" in prompt:
                    with server.lock:
                        server.flaky_left -= 1
                        failing = server.flaky_left >= 0
                    if failing:
                        return self._send(503, {"error": "overloaded"})
                answer = answer_for(prompt)
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(answer.split())}
                choice = {"message": {"role": "assistant", "content": answer}} if chat else {"text": answer}
                self._send(200, {"choices": [choice], "usage": usage})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def answer_for(prompt: str) -> str:
    """A perfect reader for the fixtures: the answer is in the prompt."""
    key = re.search(r"pass key is (\d+)", prompt)
    if key:
        return f" {key.group(1)}. That is all."
    for question, answer in [("Eiffel Tower", "Paris"), ("highest mountain", "Mount Fuji"), ("capital", "France")]:
        if question in prompt.split("Question:")[-1]:
            return answer
    return "echo: " + prompt[-20:]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_completion_and_chat_round_trip_with_api_key(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekret")
    backend = OpenAIBackend(server.url, "m", api_key_env="MY_KEY", retries=0)
    done = backend.generate(GenerationRequest(8, prompt="The pass key is 12345. What is the pass key?"))
    assert done.ok and done.text == " 12345. That is all." and done.prompt_tokens == 10 and done.completion_tokens == 4
    chat = backend.generate(GenerationRequest(8, messages=[{"role": "user", "content": "hello"}], stop_newline=True))
    assert chat.ok and chat.text.startswith("echo:")
    first, second = server.requests
    assert first["path"] == "/v1/completions" and first["max_tokens"] == 8 and first["temperature"] == 0.0
    assert second["path"] == "/v1/chat/completions" and second["stop"] == ["\n"] and second["model"] == "m"
    assert server.headers[0]["Authorization"] == "Bearer sekret"


def test_retries_with_backoff_then_success(server):
    server.flaky_left = 2
    result = OpenAIBackend(server.url, "m", retries=3, backoff=0.01).generate(GenerationRequest(4, prompt="FLAKY"))
    assert result.ok and result.attempts == 3 and len(server.requests) == 3


def test_persistent_failure_is_an_error_not_an_answer(server):
    result = OpenAIBackend(server.url, "m", retries=2, backoff=0.0).generate(GenerationRequest(4, prompt="ALWAYSFAIL"))
    assert not result.ok and result.text == "" and result.attempts == 3
    assert "HTTP 500" in result.error and "after 3 attempts" in result.error
    # a client error is not retried
    bad = OpenAIBackend(server.url, "m", retries=3, backoff=0.0).generate(GenerationRequest(4, prompt="BADREQ"))
    assert not bad.ok and bad.attempts == 1 and "HTTP 400" in bad.error


def test_timeout_and_unreachable_endpoint():
    port = free_port()
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff=0.0, timeout=2)
    with pytest.raises(EvalError, match=f"cannot reach the endpoint http://127.0.0.1:{port}/v1"):
        backend.check()
    result = backend.generate(GenerationRequest(4, prompt="x"))
    assert not result.ok and "cannot reach" in result.error and result.attempts == 2


def test_request_timeout(server):
    result = OpenAIBackend(server.url, "m", retries=0, timeout=0.2).generate(GenerationRequest(4, prompt="SLOW"))
    assert not result.ok and "tim" in result.error


def test_concurrency_limit(server):
    backend = OpenAIBackend(server.url, "m", concurrency=3, retries=0)
    results = dict(backend.generate_many([GenerationRequest(4, prompt=f"BUSY {i}") for i in range(9)]))
    assert sorted(results) == list(range(9)) and all(r.ok for r in results.values())
    assert 2 <= server.max_in_flight <= 3


def test_requests_are_taken_lazily_a_few_ahead(server):
    backend = OpenAIBackend(server.url, "m", concurrency=2, retries=0)
    built = []

    def requests():
        for i in range(12):
            built.append(i)
            yield GenerationRequest(4, prompt=f"BUSY {i}")

    for n, (_, result) in enumerate(backend.generate_many(requests()), 1):
        assert result.ok and len(built) <= n + 2 * 2
    assert n == 12 and server.max_in_flight <= 2


def test_token_ids_go_out_decoded_without_bos_and_nll_is_refused(server, tiny_llama):
    tok = tiny_llama.tokenizer
    ids = tok("The pass key is 4242. What is the pass key?").input_ids
    assert ids[0] == tok.bos_token_id
    with pytest.raises(EvalError, match="token ids and the backend's tokenizer"):
        OpenAIBackend(server.url, "m").generate(GenerationRequest(8, input_ids=ids))
    result = OpenAIBackend(server.url, "m", tokenizer=tok).generate(GenerationRequest(8, input_ids=ids))
    assert result.ok and result.text == " 4242. That is all."
    assert server.requests[-1]["prompt"] == tok.decode(ids[1:])
    with pytest.raises(EvalError, match="task 'perplexity' needs the model's log-probabilities"):
        NLLRequest(ids, 4, "perplexity").send(OpenAIBackend(server.url, "m"))


def test_bad_backend_parameters():
    with pytest.raises(EvalError, match="parameter 'base_url'"):
        OpenAIBackend("localhost:8000", "m")
    with pytest.raises(EvalError, match="parameter 'concurrency' must be >= 1"):
        OpenAIBackend("http://x/v1", "m", concurrency=0)
    with pytest.raises(EvalError, match="needs --tokenizer"):
        EvalConfig(methods=["baseline"], backend="openai", base_url="http://x/v1", api_model="m").validate()
    with pytest.raises(EvalError, match="must be \\['baseline'\\]"):
        EvalConfig(
            methods=["baseline", "rope=yarn"],
            backend="openai",
            base_url="http://x/v1",
            api_model="m",
            tokenizer="tiny-llama",
        ).validate()


def endpoint_config(server, tmp_path, **kw):
    base = dict(
        model="tiny-llama",
        methods=["baseline"],
        backend="openai",
        base_url=server.url,
        api_model="m",
        tokenizer="tiny-llama",
        retries=1,
        concurrency=2,
        run_dir=str(tmp_path / "run"),
    )
    return EvalConfig(**{**base, **kw})


def test_suite_on_endpoint_errors_counted_apart_then_retried_on_resume(server, tmp_path):
    server.fail_on = "Which country"
    cfg = endpoint_config(
        server, tmp_path, suite="longbench", tasks=["hotpotqa"], lengths=[4000], data_dir=str(FIX / "longbench")
    )
    run = evaluate(cfg, progress=False)
    records = {r["record_id"]: r for r in load_records(run)}
    assert records["hp-1"]["score"] == 100.0 and records["hp-2"]["score"] == 100.0
    failed = records["hp-3"]
    assert failed["score"] is None and "HTTP 500" in failed["error"] and failed["attempts"] == 2
    cell = json.loads((run / "suite_summary.json").read_text())["scores"]["baseline"]["4000"]["longbench/hotpotqa"]
    assert cell == {"score": 100.0, "n": 2, "errors": 1}
    server.fail_on = None
    seen = []
    evaluate(cfg, progress=False, on_record=seen.append)
    assert [r["record_id"] for r in seen] == ["hp-3"] and seen[0]["score"] == 100.0


def test_builtin_passkey_task_on_endpoint(server, tmp_path):
    cfg = endpoint_config(server, tmp_path, tasks=["passkey"], lengths=[512], depths=[0.5], samples=2)
    run = evaluate(cfg, progress=False)
    records = load_records(run)
    assert len(records) == 2 and all(r["score"] == 100.0 for r in records)
    assert server.requests[0]["path"] == "/v1/completions"


def test_cli_endpoint_suite_and_unreachable(server, tmp_path):
    runner = CliRunner()
    common = [
        "eval",
        "--backend",
        "openai",
        "--api-model",
        "m",
        "--tokenizer",
        "tiny-llama",
        "--suite",
        "longbench",
        "--data-dir",
        str(FIX / "longbench"),
        "--task",
        "hotpotqa",
        "--no-report",
    ]
    out = runner.invoke(app, [*common, "--base-url", server.url, "--out", str(tmp_path / "ok")])
    assert out.exit_code == 0, out.output
    assert "longbench: official score per task" in out.stdout and "100.00" in out.stdout
    dead = runner.invoke(
        app, [*common, "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--out", str(tmp_path / "x")]
    )
    assert dead.exit_code == 2 and "cannot reach the endpoint" in dead.output
