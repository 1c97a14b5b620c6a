"""The LLM client resource: an OpenAI-compatible chat endpoint with retries, a hard call budget and
bounded concurrency.

Offline by default: with no `base_url`/`model` the resource is disabled and labeling/scoring use the
offline methods. The API key is never logged, never put into metadata, reprs or error messages.

    LLMResource(base_url="https://api.openai.com/v1", model="gpt-4o-mini",
                api_key=EnvVar("INTERP_LLM_API_KEY"), max_calls=500)
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
from pydantic import Field, PrivateAttr

from interp_assets.threads import results_when_done

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
NO_KEY_PLACEHOLDER = "EMPTY"  # sent when no key is configured (local servers such as vLLM ignore it)


class LLMError(RuntimeError):
    """A chat request that failed for good (after retries, or not retryable). `status` names the failure
    in the labels' and scores' `status` column."""

    status = "failed"


class LLMBudgetExhausted(LLMError):
    """The resource's `max_calls` budget is spent; the request was not sent."""

    status = "budget_exhausted"


class LLMRefusal(LLMError):
    """The model refused (the API's `refusal` field, or finish_reason "content_filter"); not retried."""

    status = "refused"


class LLMTruncated(LLMError):
    """The answer was cut off at max_tokens even after one retry with twice the tokens; `partial` is
    what came back."""

    status = "truncated"

    def __init__(self, message: str, partial: str = ""):
        super().__init__(message)
        self.partial = partial


class _Budget:
    """Thread-safe counter of HTTP attempts that never goes past `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.used >= self.limit:
                raise LLMBudgetExhausted(
                    f"LLM call budget exhausted: all {self.limit} calls allowed by max_calls were used "
                    "(retries count). Results obtained so far are kept; raise max_calls on the LLM "
                    "resource to process the rest."
                )
            self.used += 1


class LLMResource(dg.ConfigurableResource):
    """OpenAI-compatible chat client with a call budget, retries with backoff, and a bounded thread pool."""

    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint, e.g. .../v1.")
    model: str | None = Field(default=None, description="Model name; labels record it as `llm:<model>`.")
    api_key: str | None = Field(
        default=None, repr=False, description='Set with EnvVar("INTERP_LLM_API_KEY"); never logged.'
    )
    max_concurrency: int = Field(default=4, description="Requests in flight at once (map_chat).")
    max_calls: int = Field(default=200, description="Budget: HTTP attempts (retries included) per run.")
    max_retries: int = Field(default=4, description="Retries after the first attempt (429, 5xx, timeouts).")
    timeout_s: float = Field(default=60.0, description="Per-request timeout in seconds.")
    backoff_base_s: float = Field(default=1.0, description="First backoff; doubles each retry, with jitter.")
    backoff_max_s: float = Field(
        default=60.0, description="Longest wait between retries (also for Retry-After)."
    )
    temperature: float = 0.0
    max_tokens: int = 800

    _budget: _Budget | None = PrivateAttr(default=None)
    _client: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def enabled(self) -> bool:
        """True when both `base_url` and `model` are set; otherwise callers take the offline path."""
        return bool(self.base_url) and bool(self.model)

    @property
    def calls_made(self) -> int:
        """HTTP attempts made so far by this resource instance (retries included)."""
        return self._get_budget().used

    def _get_budget(self) -> _Budget:
        with self._lock:
            if self._budget is None:
                self._budget = _Budget(self.max_calls)
            return self._budget

    def _get_client(self) -> Any:
        if not self.enabled:
            raise LLMError(
                "The LLM resource is not configured: set both base_url and model (or use the offline path)."
            )
        with self._lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=self._key() or NO_KEY_PLACEHOLDER,
                    max_retries=0,
                    timeout=self.timeout_s,
                )
            return self._client

    def _key(self) -> str | None:
        key = self.api_key
        if isinstance(key, dg.EnvVar):  # constructed outside Dagster: resolve the variable ourselves
            key = key.get_value()
        return key or None

    def _redact(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key and len(key) >= 4 else text

    def _endpoint(self) -> str:
        parts = urlsplit(self.base_url or "")
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def chat_json(self, messages: Messages) -> str:
        """Send one chat request and return the assistant's text (the caller parses the JSON in it).

        Retries 429 (waiting at least its Retry-After), 5xx, timeouts, connection errors and malformed
        response bodies with exponential backoff and jitter; 400/401/403/404 fail at once. An answer cut
        off at max_tokens (finish_reason "length") is asked again once with twice the tokens, then raises
        `LLMTruncated`; a refusal raises `LLMRefusal` at once. Every HTTP attempt takes one call from the
        budget; `LLMBudgetExhausted` when none is left.
        """
        import openai

        client = self._get_client()
        budget = self._get_budget()
        attempts = self.max_retries + 1
        max_tokens = self.max_tokens
        last = ""
        for attempt in range(attempts):
            budget.take()
            retry_after: float | None = None
            try:
                response = client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=self.temperature,
                    max_tokens=max_tokens,
                )
                choice = response.choices[0]
                refusal = getattr(choice.message, "refusal", None)
                if refusal or choice.finish_reason == "content_filter":
                    raise LLMRefusal(
                        f"the model refused ({_short(refusal or 'finish_reason content_filter', 120)})"
                    )
                content = choice.message.content
                if choice.finish_reason == "length":
                    if max_tokens > self.max_tokens or attempt + 1 == attempts:
                        raise LLMTruncated(
                            f"the answer was cut off at max_tokens={max_tokens} (finish_reason length)",
                            content or "",
                        )
                    max_tokens *= 2
                    last = f"answer cut off at max_tokens={self.max_tokens}"
                    log.warning("LLM answer %s; asking again with max_tokens=%d.", last, max_tokens)
                    continue
                if content is None:
                    raise ValueError("the response has no message content")
                return content
            except openai.APIStatusError as exc:
                status = exc.status_code
                last = f"HTTP {status}: {self._redact(_short(exc.message))}"
                if status not in RETRYABLE_STATUS:
                    raise LLMError(
                        f"LLM request to {self._endpoint()} failed with {last}; not retried. "
                        f"{_status_hint(status)}"
                    ) from None
                retry_after = _retry_after_s(exc.response.headers) if status == 429 else None
            except openai.APITimeoutError:
                last = f"timed out after {self.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                last = f"connection error ({self._redact(_short(str(exc)))})"
            except (ValueError, AttributeError, IndexError) as exc:  # malformed response body
                last = f"malformed response ({self._redact(_short(str(exc)))})"
            if attempt + 1 == attempts:
                break
            wait = self._wait_s(attempt, retry_after, last)
            log.warning(
                "LLM request to %s %s; retrying in %.2f s (attempt %d of %d).",
                self._endpoint(),
                last,
                wait,
                attempt + 2,
                attempts,
            )
            time.sleep(wait)
        raise LLMError(
            f"LLM request to {self._endpoint()} failed after {attempts} attempts; last error: {last}. "
            "Check the endpoint, or raise max_retries / timeout_s on the LLM resource."
        )

    def _wait_s(self, attempt: int, retry_after: float | None, last: str) -> float:
        if retry_after is not None:
            if retry_after > self.backoff_max_s:
                raise LLMError(
                    f"LLM request to {self._endpoint()} {last}: the server asked to wait {retry_after:g} s, "
                    f"more than backoff_max_s={self.backoff_max_s:g}. Try later or raise backoff_max_s."
                )
            return retry_after + random.uniform(0.0, 0.1 * max(retry_after, self.backoff_base_s))
        cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return cap / 2 + random.uniform(0.0, cap / 2)

    def map_chat(self, requests: Sequence[Messages]) -> list[str | LLMError]:
        """Run `chat_json` over many requests on at most `max_concurrency` threads, in input order.

        Each item is the answer text or the `LLMError` of that request; once the budget is spent the
        remaining requests fail fast with `LLMBudgetExhausted` and earlier answers are kept.
        """
        if not requests:
            return []

        def one(messages: Messages) -> str | LLMError:
            try:
                return self.chat_json(messages)
            except LLMError as exc:
                return exc

        workers = max(1, min(self.max_concurrency, len(requests)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm")
        try:
            return results_when_done([pool.submit(one, messages) for messages in requests])
        finally:
            # An interrupt (Ctrl-C, a stopped run) neither waits for nor pays for the requests still queued:
            # they are cancelled, and the at most `workers` in flight end on their own (within timeout_s).
            pool.shutdown(wait=False, cancel_futures=True)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _status_hint(status: int) -> str:
    if status in (401, 403):
        return "Check the API key (INTERP_LLM_API_KEY) and its permissions."
    if status == 404:
        return "Check base_url and model."
    return "Check the request (model name, parameters)."


def _retry_after_s(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date); None if absent."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, parsed.timestamp() - time.time())
