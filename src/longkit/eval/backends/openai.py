"""Any OpenAI-compatible HTTP endpoint (vLLM, SGLang, llama.cpp server, OpenAI): completions and chat.

Standard library only (``urllib`` + threads): no SDK, no extra dependency. Greedy (temperature 0).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from typing import Any

from longkit.errors import EvalError
from longkit.eval.backends.base import GenerationRequest, GenerationResult, NLLRequest

#: HTTP statuses worth retrying: rate limits, timeouts and server-side failures.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAIBackend:
    """Requests to ``{base_url}/completions`` (plain prompts) or ``{base_url}/chat/completions`` (messages).

    Parameters: ``base_url`` such as ``http://localhost:8000/v1``; ``model`` the served model name; the API key
    is read from the environment variable ``api_key_env`` (default ``OPENAI_API_KEY``; no header when unset);
    ``timeout`` seconds per request (> 0); ``retries`` extra attempts (>= 0) for connection errors, timeouts
    and HTTP 408/409/425/429/5xx, waiting ``backoff * 2**attempt`` seconds (capped at ``max_backoff``);
    ``concurrency`` parallel requests (>= 1). A request that still fails returns a result with ``error`` set.
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
        timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 4,
        temperature: float = 0.0,
        tokenizer: Any = None,
    ):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise EvalError(
                f"parameter 'base_url' must be an http(s) URL such as http://localhost:8000/v1 (got {base_url!r})"
            )
        if not model:
            raise EvalError("parameter 'model' must name the served model (e.g. --api-model meta-llama/Llama-3.1-8B)")
        if timeout <= 0:
            raise EvalError(f"parameter 'timeout' must be > 0 seconds (got {timeout})")
        if retries < 0:
            raise EvalError(f"parameter 'retries' must be >= 0 (got {retries})")
        if concurrency < 1:
            raise EvalError(f"parameter 'concurrency' must be >= 1 (got {concurrency})")
        if backoff < 0:
            raise EvalError(f"parameter 'backoff' must be >= 0 seconds (got {backoff})")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = os.environ.get(api_key_env) or None
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self.temperature = temperature
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------------------------------------ HTTP
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def check(self) -> None:
        """Fail early with a clear error when nothing listens at ``base_url`` (any HTTP answer counts as alive)."""
        req = urllib.request.Request(self.base_url + "/models", method="GET")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=min(self.timeout, 30.0)):
                pass
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise EvalError(
                f"cannot reach the endpoint {self.base_url} ({reason}); check --base-url and that the server runs"
            ) from None

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
    def _parse(path: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        choice = data["choices"][0]
        text = choice["message"]["content"] if path == "/chat/completions" else choice["text"]
        return text or "", data.get("usage") or {}

    def generate(self, request: GenerationRequest) -> GenerationResult:
        path, body = self.body(request)
        error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            retry = True
            try:
                t0 = time.perf_counter()
                data = self._post(path, body)
                text, usage = self._parse(path, data)
                return GenerationResult(
                    text=text,
                    prompt_tokens=usage.get("prompt_tokens"),
                    completion_tokens=usage.get("completion_tokens"),
                    attempts=attempt + 1,
                    stats={"request_s": round(time.perf_counter() - t0, 4)},
                )
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300] if err.fp else ""
                error = f"HTTP {err.code} from {self.base_url}{path}: {detail or err.reason}"
                retry = err.code in RETRY_STATUS
            except TimeoutError:
                error = f"timeout after {self.timeout:g} s at {self.base_url}{path}"
            except urllib.error.URLError as err:
                error = f"cannot reach {self.base_url}{path}: {err.reason}"
            except (KeyError, IndexError, TypeError, ValueError) as err:
                error = f"malformed response from {self.base_url}{path}: {type(err).__name__}: {err}"
                retry = False
            except OSError as err:
                error = f"connection error at {self.base_url}{path}: {err}"
            if not retry:
                return GenerationResult(error=error, attempts=attempt + 1)
        return GenerationResult(error=f"{error} (after {self.retries + 1} attempts)", attempts=self.retries + 1)

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
