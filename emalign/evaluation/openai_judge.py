"""A judge behind an OpenAI-compatible chat completions endpoint (OpenAI, vLLM, ...).

As upstream EM (Betley et al. 2025) did, one user message is sent with ``max_tokens=1,
temperature=0, logprobs=True, top_logprobs=20``; the 20 most likely first tokens are turned
into a 0..100 score or a label by :mod:`emalign.evaluation.scoring`.

An evaluation makes thousands of requests, so nothing here is fatal except a rejected key:
timeouts, connection errors, 429 and 5xx are retried with exponential backoff (``Retry-After``
honoured); a reply that is not the expected JSON is counted in ``stats["malformed"]`` and
comes back as ``JudgeResult(None, None, {"error": ...})``. The API key is read from an
environment variable at request time and goes only into the Authorization header: never into
logs, errors, ``raw`` or ``stats``.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import requests
import urllib3

from emalign.errors import UserError, check_range
from emalign.evaluation.scoring import (
    MIN_NUMBER_MASS,
    Judge,
    JudgeResult,
    ScoreMode,
    aggregate_0_100,
    aggregate_labels,
    check_mode,
    labels_from_tokens,
    numbers_from_tokens,
)

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class JudgeAuthError(UserError, RuntimeError):
    """The endpoint rejected the credentials (401/403): no later request can succeed."""


class JudgeUnavailableError(UserError):
    """The judge gave no usable answer to the first, cheap request of an evaluation."""


class _Malformed(Exception):
    """A reply that is not a chat completion with top logprobs."""


class _Failed(Exception):
    """A request that did not succeed after its retries (or a non-retryable HTTP error)."""


class OpenAIJudge(Judge):
    """Judge via ``POST {base_url}/chat/completions`` reading the first token's top logprobs."""

    def __init__(
        self,
        base_url: str = "https://api.openai.com/v1",
        model: str = "gpt-4o-2024-08-06",
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 30,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        top_logprobs: int = 20,
        min_mass: float = MIN_NUMBER_MASS,
        concurrency: int = 8,
        max_reply_bytes: int = 1 << 20,
    ) -> None:
        """
        Args:
            base_url: API root; ``/chat/completions`` is appended.
            model: judge model name (upstream: gpt-4o-2024-08-06).
            api_key_env: environment variable holding the key; unset means no Authorization
                header (a local vLLM server needs none).
            timeout_s: per-request timeout in seconds.
            max_retries: retries after the first attempt for transient errors.
            backoff_s: first backoff; doubles on every retry.
            max_backoff_s: cap on one wait (also on ``Retry-After``).
            top_logprobs: alternatives per token to ask for (OpenAI allows up to 20).
            min_mass: below this total number/label probability there is no score/label.
            concurrency: requests in flight at once in :meth:`judge_many` (upstream ran its
                judge calls concurrently too; thousands of sequential calls take hours).
            max_reply_bytes: a longer reply is cut off and counted as malformed (one token's top-20
                logprobs take a few kB), so a broken server cannot fill the memory.
        """
        check_range("judge.max_retries", max_retries, 0)
        check_range("judge.timeout_s", timeout_s, 0, low_open=True)
        check_range("judge.backoff_s", backoff_s, 0)
        check_range("judge.concurrency", concurrency, 1)
        check_range("judge.max_reply_bytes", max_reply_bytes, 1024)
        check_range("judge.max_backoff_s", max_backoff_s, 0)
        check_range("judge.top_logprobs", top_logprobs, 1, 20)  # OpenAI's bound
        check_range("judge.min_mass", min_mass, 0, 1)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.top_logprobs = top_logprobs
        self.min_mass = min_mass
        self.concurrency = concurrency
        self.max_reply_bytes = max_reply_bytes
        self.stats = {"requests": 0, "retries": 0, "malformed": 0, "failures": 0}
        self._init_runtime()

    def _init_runtime(self) -> None:
        # One session per thread: requests.Session is not documented as thread-safe.
        self._local = threading.local()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"], state["_lock"]  # neither pickles; rebuilt on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    @property
    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    @property
    def identity(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

    # -- HTTP ------------------------------------------------------------------------------

    def _key(self) -> str:
        return os.environ.get(self.api_key_env, "").strip()

    def _redact(self, text: str) -> str:
        """Remove the key from text that came back from the server, should it echo it."""
        key = self._key()
        return text.replace(key, "***") if key else text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to sleep before retry number ``attempt`` (0-based)."""
        delay = self.backoff_s * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:  # an HTTP date, or garbage (then the backoff stands)
                try:
                    delay = max(
                        delay, email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
                    )
                except (TypeError, ValueError):
                    pass
        return min(max(delay, 0.0), self.max_backoff_s)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries; returns the parsed JSON or raises ``_Malformed`` / ``_Failed``."""
        url = f"{self.base_url}/chat/completions"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            retry_after = None
            try:
                # Streamed, so that the body is read under the whole-request deadline and the size cap.
                resp = self._session.post(url, json=body, headers=self._headers(), timeout=self.timeout_s,
                                          stream=True)
                content = self._read(resp) if resp.status_code == 200 else None
            except (
                requests.Timeout,
                requests.ConnectionError,
                requests.exceptions.ChunkedEncodingError,
            ) as err:
                last = type(err).__name__  # the exception text may echo request details
            except requests.RequestException as err:  # e.g. a bad URL: retrying cannot help
                raise _Failed(type(err).__name__) from err
            else:
                if resp.status_code in (401, 403):
                    raise JudgeAuthError(
                        f"{self.identity}: HTTP {resp.status_code}; check ${self.api_key_env}"
                    )
                if resp.status_code == 200:
                    try:
                        return json.loads(content)
                    except ValueError as err:
                        raise _Malformed("reply is not JSON") from err
                if resp.status_code not in _RETRY_STATUS:
                    start = next(resp.iter_content(200), b"").decode("utf-8", errors="replace")  # not the whole body
                    raise _Failed(f"HTTP {resp.status_code}: {self._redact(start)}")
                last = f"HTTP {resp.status_code}"
                retry_after = resp.headers.get("Retry-After")
            if attempt < self.max_retries:
                delay = self._wait(attempt, retry_after)
                log.warning("judge %s: %s; retry %d in %.2fs", self.identity, last, attempt + 1, delay)
                time.sleep(delay)
        raise _Failed(f"gave up after {self.max_retries + 1} attempts: {last}")

    def _read(self, resp: requests.Response) -> bytes:
        """The body, within ``timeout_s`` for the whole request and at most ``max_reply_bytes``.

        requests' timeout bounds each socket read, and a buffered read loops until it has all it asked
        for, so a server sending one byte a second would hold a request for as long as it likes. urllib3's
        ``read1`` returns whatever one read brings, so the deadline is checked between reads.
        """
        deadline = time.monotonic() + self.timeout_s
        chunks, size = [], 0
        try:
            while True:
                if time.monotonic() > deadline:
                    raise requests.Timeout(f"reply not complete within timeout_s={self.timeout_s}")
                chunk = resp.raw.read1(16384, decode_content=True)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > self.max_reply_bytes:
                    raise _Malformed(f"reply longer than max_reply_bytes={self.max_reply_bytes}")
                chunks.append(chunk)
        except urllib3.exceptions.HTTPError as err:  # a broken or timed-out read
            raise requests.exceptions.ChunkedEncodingError(type(err).__name__) from None
        finally:
            resp.close()

    @staticmethod
    def _first_token_probs(reply: dict[str, Any]) -> dict[str, float]:
        """token -> probability over the first answer token's top logprobs."""
        try:
            entries = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            probs: dict[str, float] = {}
            for e in entries:
                token, lp = e["token"], float(e["logprob"])
                if not isinstance(token, str) or math.isnan(lp):
                    raise TypeError("bad top_logprobs entry")
                # Distinct ids can share a string (vLLM); their probabilities add up.
                probs[token] = probs.get(token, 0.0) + math.exp(lp)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise _Malformed(f"no top_logprobs in reply ({type(err).__name__})") from err
        if not probs:
            raise _Malformed("empty top_logprobs")
        return probs

    # -- Judge -----------------------------------------------------------------------------

    def check(self) -> None:
        """One cheap request (one token) before anything is sampled: a wrong URL, a rejected key or a
        server that does not speak this API fail here in one line, not after a batch of sampling."""
        body = {"model": self.model, "messages": [{"role": "user", "content": "Reply with a number from 0 to 100."}],
                "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": self.top_logprobs}
        try:
            self._first_token_probs(self._post(body))
        except (_Failed, _Malformed) as err:
            raise JudgeUnavailableError(f"judge {self.identity}: no usable answer to a first request ({err}); "
                                        "nothing was sampled: check base_url, model and the server") from None

    def judge_one(
        self, prompt: str, mode: ScoreMode = "score_0_100", labels: Sequence[str] | None = None
    ) -> JudgeResult:
        """Judge one prompt; transient and malformed failures give an error result."""
        check_mode(mode, labels)
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
            "seed": 0,
        }
        try:
            token_probs = self._first_token_probs(self._post(body))
        except _Malformed as err:
            self._count("malformed")
            log.warning("judge %s: malformed reply: %s", self.identity, err)
            return JudgeResult(None, None, {"error": f"malformed: {err}"})
        except _Failed as err:
            self._count("failures")
            log.warning("judge %s: request failed: %s", self.identity, err)
            return JudgeResult(None, None, {"error": str(err)})
        top = sorted(token_probs.items(), key=lambda kv: -kv[1])
        if mode == "score_0_100":
            result = aggregate_0_100(numbers_from_tokens(token_probs), self.min_mass)
        else:
            assert labels is not None
            result = aggregate_labels(labels_from_tokens(token_probs, labels), labels, self.min_mass)
        result.raw["top_tokens"] = [[t, p] for t, p in top]
        return result

    def judge_many(
        self, prompts: Sequence[str], mode: ScoreMode = "score_0_100", labels: Sequence[str] | None = None
    ) -> list[JudgeResult]:
        if self.concurrency == 1 or len(prompts) <= 1:
            return [self.judge_one(p, mode, labels) for p in prompts]
        with ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self.judge_one(p, mode, labels), prompts))
