"""Any OpenAI-compatible HTTP endpoint (vLLM, SGLang, llama.cpp server, OpenAI): completions and chat.

Standard library only (``urllib`` + threads): no SDK, no extra dependency. Greedy (temperature 0).

Every transport failure of a request becomes its result's ``error`` (recorded, never scored, retried by a resumed
run), never an exception out of :meth:`OpenAIBackend.generate` and never an empty answer: HTTP errors, timeouts,
refused or reset connections, bodies cut short of their Content-Length, bodies that are not JSON, and JSON without
``choices`` or with ``content: null``.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from typing import Any

from longkit.errors import EvalError
from longkit.eval.backends.base import GenerationRequest, GenerationResult, NLLRequest

#: HTTP statuses worth retrying: rate limits, timeouts and server-side failures (every 5xx).
RETRY_STATUS = frozenset({408, 409, 425, 429})
#: HTTP statuses that no retry can fix, with what they mean for the user.
FATAL_STATUS = {401: "authentication failed", 403: "access denied", 404: "not found (check --base-url and --api-model)"}
#: Defaults: a server that does not accept a connection within CONNECT_TIMEOUT seconds is down; an answer (the whole
#: generation: requests are not streamed, so nothing arrives before it ends) may take up to READ_TIMEOUT seconds.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0
#: The start-up check (GET /models) answers at once on a live server: it waits at most this long for the answer.
CHECK_TIMEOUT = 30.0


class ResponseError(Exception):
    """An answer that arrived but is not a usable completion (``retry``: whether another attempt may fix it)."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    """urllib with two timeouts: ``urlopen(timeout=...)`` bounds the connection, ``read_timeout`` each wait for data
    once connected (urllib alone has one timeout for both). Proxies from the environment still apply."""

    def connection(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Connection(base):  # type: ignore[valid-type, misc]
            def connect(self) -> None:
                super().connect()
                self.sock.settimeout(read_timeout)

        return Connection

    http_conn, https_conn = connection(http.client.HTTPConnection), connection(http.client.HTTPSConnection)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(http_conn, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(https_conn, req, context=self._context)

    return urllib.request.build_opener(HTTP, HTTPS)


class OpenAIBackend:
    """Requests to ``{base_url}/completions`` (plain prompts) or ``{base_url}/chat/completions`` (messages).

    Parameters: ``base_url`` such as ``http://localhost:8000/v1``; ``model`` the served model name; the API key
    is read from the environment variable ``api_key_env`` (default ``OPENAI_API_KEY``; no header when unset);
    ``timeout`` seconds to wait for an answer once connected (> 0; the whole generation, as answers are not
    streamed) and ``connect_timeout`` seconds to wait for the connection (> 0); ``retries`` extra attempts (>= 0)
    for connection errors, resets, timeouts, bodies cut short or not JSON, and HTTP 408/409/425/429/5xx, waiting
    ``backoff * 2**attempt`` seconds (or the server's ``Retry-After``; capped at ``max_backoff``); HTTP 401/403/404
    and other 4xx are not retried. ``concurrency`` parallel requests (>= 1). A request that still fails returns a
    result with ``error`` set. ``warn`` receives one line per failed attempt that is retried (default: stderr).
    ``tokenizer`` (optional, local) lets requests of token ids go out as text: decoded with their template markers,
    less a leading BOS (the server adds its own).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = READ_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 4,
        temperature: float = 0.0,
        tokenizer: Any = None,
        warn: Callable[[str], None] | None = None,
    ):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise EvalError(
                f"parameter 'base_url' must be an http(s) URL such as http://localhost:8000/v1 (got {base_url!r})"
            )
        if not model:
            raise EvalError("parameter 'model' must name the served model (e.g. --api-model meta-llama/Llama-3.1-8B)")
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not value > 0:
                raise EvalError(f"parameter '{name}' must be > 0 seconds (got {value})")
        if retries < 0:
            raise EvalError(f"parameter 'retries' must be >= 0 (got {retries})")
        if concurrency < 1:
            raise EvalError(f"parameter 'concurrency' must be >= 1 (got {concurrency})")
        if backoff < 0 or max_backoff < 0:
            raise EvalError(f"parameters 'backoff' and 'max_backoff' must be >= 0 seconds (got {backoff}, {max_backoff})")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.api_key = os.environ.get(api_key_env) or None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self.temperature = temperature
        self.tokenizer = tokenizer
        self.warn = warn or _stderr
        self._opener = _opener(timeout)
        self._check_opener = _opener(min(timeout, CHECK_TIMEOUT))

    # ------------------------------------------------------------------------------------------------ HTTP
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers=self._headers(), method="POST"
        )
        with self._opener.open(req, timeout=self.connect_timeout) as resp:
            # Raises http.client.IncompleteRead when the body is shorter than its Content-Length.
            raw = resp.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            # A proxy's HTML page or a body garbled in transit: worth another attempt.
            raise ResponseError(f"invalid JSON body ({err}; starts {raw[:80]!r})", retry=True) from None

    def _fatal(self, code: int) -> str | None:
        what = FATAL_STATUS.get(code)
        if code in (401, 403):
            key = f"${self.api_key_env} is set" if self.api_key else f"${self.api_key_env} is not set"
            return f"{what} (HTTP {code}; the API key is read from --api-key-env, and {key})"
        return what

    def check(self) -> None:
        """Fail early with a clear error when nothing answers at ``base_url``, or it refuses our credentials.

        An endpoint that answers ``GET /models`` with anything but 401/403 is alive (servers without the route
        answer 404, which says nothing about completions).
        """
        req = urllib.request.Request(self.base_url + "/models", headers=self._headers(), method="GET")
        where = f"the endpoint {self.base_url}"
        try:
            with self._check_opener.open(req, timeout=self.connect_timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise EvalError(f"{where}: {self._fatal(err.code)}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):
                reason = f"no answer to GET /models within {min(self.timeout, CHECK_TIMEOUT):g} s"
            raise EvalError(f"cannot reach {where} ({reason}); check --base-url and that the server runs") from None

    def body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_new_tokens,
            "temperature": self.temperature,
        }
        if request.stop_newline:
            body["stop"] = ["\n"]
        if request.messages is not None:
            return "/chat/completions", {**body, "messages": request.messages}
        return "/completions", {**body, "prompt": self._text(request)}

    def _text(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        if request.input_ids is None or self.tokenizer is None:
            raise EvalError("an endpoint request needs prompt text, chat messages, or token ids and the backend's "
                            "tokenizer to decode them")
        ids, bos = request.input_ids, getattr(self.tokenizer, "bos_token_id", None)
        return self.tokenizer.decode(ids[1:] if ids and ids[0] == bos else ids)

    def nll(self, request: NLLRequest) -> dict[str, Any]:
        raise EvalError(f"task '{request.task}' needs the model's log-probabilities; it runs with --backend hf only")

    @staticmethod
    def _parse(path: str, data: Any) -> tuple[str, dict[str, Any]]:
        """The generated text and usage of a completion; a :class:`ResponseError` for anything else.

        ``content: null`` (a refusal, a tool call, a filtered answer) is not an empty answer: scoring it would
        count a failure of the server as a wrong answer of the model.
        """
        if not isinstance(data, dict):
            raise ResponseError(f"response is JSON {type(data).__name__}, not an object", retry=False)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            detail = f" (error: {str(data['error'])[:200]})" if data.get("error") else ""
            raise ResponseError(f"response has no choices{detail}", retry=False)
        choice = choices[0]
        if path == "/chat/completions":
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
            field = "choices[0].message.content"
        else:
            text, field = choice.get("text"), "choices[0].text"
        if not isinstance(text, str):
            reason = choice.get("finish_reason")
            why = f" (finish_reason {reason!r})" if reason else ""
            raise ResponseError(f"response has {field} = {json.dumps(text)}, not text{why}", retry=False)
        usage = data.get("usage")
        return text, usage if isinstance(usage, dict) else {}

    def _attempt(self, path: str, body: dict[str, Any]) -> tuple[GenerationResult | None, str, bool, float]:
        """One request: ``(result, "", _, _)`` on success, else ``(None, error, retry?, seconds to wait first)``."""
        where = f"{self.base_url}{path}"
        wait_s = 0.0
        try:
            t0 = time.perf_counter()
            text, usage = self._parse(path, self._post(path, body))
            return GenerationResult(text=text, prompt_tokens=usage.get("prompt_tokens"),
                                    completion_tokens=usage.get("completion_tokens"),
                                    stats={"request_s": round(time.perf_counter() - t0, 4)}), "", False, 0.0
        except urllib.error.HTTPError as err:
            try:
                detail = err.read().decode("utf-8", "replace")[:300] if err.fp else ""
            except (http.client.HTTPException, OSError):
                detail = ""
            fatal = self._fatal(err.code)
            error = f"HTTP {err.code} from {where}: {fatal + '; ' if fatal else ''}{detail or err.reason}"
            retry = err.code in RETRY_STATUS or err.code >= 500
            wait_s = _retry_after(err.headers.get("Retry-After") if err.headers else None)
        except ResponseError as err:
            error, retry = f"{err} from {where}", err.retry
        except http.client.IncompleteRead as err:
            error, retry = f"response body cut short from {where}: {len(err.partial)} bytes read, " \
                           f"{err.expected} more expected", True
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                error = f"no connection within {self.connect_timeout:g} s to {where}"
            else:
                error = f"cannot reach {where}: {err.reason}"
            retry = True
        except TimeoutError:
            error, retry = f"no answer within {self.timeout:g} s from {where} (read timeout)", True
        except (http.client.HTTPException, OSError) as err:
            # Resets, a server that closed the connection without an answer, a garbled status line.
            error, retry = f"connection error at {where}: {type(err).__name__}: {err}", True
        return None, error, retry, wait_s

    def generate(self, request: GenerationRequest) -> GenerationResult:
        path, body = self.body(request)
        label = request.label or path
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            result, error, retry, wait_s = self._attempt(path, body)
            if result is not None:
                result.attempts = attempt
                return result
            if not retry:
                return GenerationResult(error=error, attempts=attempt)
            if attempt < attempts:
                delay = min(max(wait_s, self.backoff * 2 ** (attempt - 1)), self.max_backoff)
                self.warn(f"warning: {label}: attempt {attempt}/{attempts} failed: {error}; retrying in {delay:g} s")
                time.sleep(delay)
        return GenerationResult(error=f"{error} (after {attempts} attempts)" if attempts > 1 else error,
                                attempts=attempts)

    def generate_many(self, requests: Iterable[GenerationRequest | NLLRequest]) -> Iterator[tuple[int, Any]]:
        """Up to ``concurrency`` requests in flight; yields ``(index, result)`` as each finishes.

        Requests are taken from ``requests`` as slots free up (a few ahead), so a lazy iterable of long prompts is
        never held in memory at once.
        """
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            pending: dict[Any, int] = {}
            for index, request in enumerate(requests):
                pending[pool.submit(request.send, self)] = index
                if len(pending) >= 2 * self.concurrency:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield pending.pop(future), future.result()
            for future in as_completed(pending):
                yield pending[future], future.result()


def _retry_after(value: str | None) -> float:
    """Seconds of a numeric ``Retry-After`` header (429/503); 0 when absent or an HTTP date."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
