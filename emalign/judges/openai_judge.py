"""A judge behind an OpenAI-compatible chat completions endpoint (OpenAI, vLLM, ...).

As upstream EM (Betley et al. 2025) did, one user message is sent with ``max_tokens=1,
temperature=0, logprobs=True, top_logprobs=20``; the 20 most likely first tokens are turned
into a 0..100 score or a label by :mod:`emalign.judges.scoring`.

An evaluation makes thousands of requests, so nothing here is fatal except a rejected key:
timeouts, connection errors, 429 and 5xx are retried with exponential backoff (``Retry-After``
honoured); a reply that is not the expected JSON is counted in ``stats["malformed"]`` and
comes back as ``JudgeResult(None, None, {"error": ...})``. The API key is read from an
environment variable at request time and goes only into the Authorization header: never into
logs, errors, ``raw`` or ``stats``.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from emalign.errors import UserError, check_range
from emalign.judges.scoring import (
    MIN_NUMBER_MASS, Judge, JudgeResult, ScoreMode, aggregate_0_100, aggregate_labels, check_mode,
    labels_from_tokens, numbers_from_tokens,
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


class _Cancelled(Exception):
    """The batch was interrupted (Ctrl+C): no further attempt, no further wait."""


def endpoint(base_url: str) -> str:
    """``{base_url}/chat/completions``, the path joined before the query (``?api-version=...`` stays a query)."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/chat/completions", parts.query, ""))


def public_url(base_url: str) -> str:
    """``base_url`` fit to write down: user and password, query values and the fragment replaced by ``***``."""
    parts = urlsplit(base_url)
    host = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{key}=***" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, ("***@" if "@" in parts.netloc else "") + host, parts.path, query, ""))


def url_secrets(base_url: str) -> list[str]:
    """The parts of ``base_url`` that :func:`public_url` hides (user, password, query values)."""
    parts = urlsplit(base_url)
    found = [parts.username, parts.password, *(value for _, value in parse_qsl(parts.query))]
    return [value for value in found if value]


class _Watched:
    """One request's connections, so that a watchdog can cut them when its deadline passes."""

    def __init__(self) -> None:
        self.connections: list = []
        self.expired = False

    def cut(self) -> None:
        for conn in self.connections:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # a recv blocked on a trickling server returns at once
                except OSError:
                    pass


_current = threading.local()


def _watching(pool_class):
    class Pool(pool_class):
        def _get_conn(self, timeout=None):
            conn = super()._get_conn(timeout)
            watched = getattr(_current, "watched", None)
            if watched is not None:
                watched.connections.append(conn)
            return conn

    return Pool


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with pools that hand each connection to the request's :class:`_Watched`: requests'
    own timeout bounds each socket read, so a server trickling its status line and headers a byte at a time
    would otherwise hold a request for as long as it likes."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _watching(urllib3.HTTPConnectionPool), "https": _watching(urllib3.HTTPSConnectionPool)}


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
            base_url: API root; ``/chat/completions`` is appended to its path. A user, password or query
                value in it is sent but never written or printed (``***`` in the judge's identity).
            model: judge model name (upstream: gpt-4o-2024-08-06).
            api_key_env: environment variable holding the key; unset means no Authorization
                header (a local vLLM server needs none).
            timeout_s: deadline of one attempt in seconds, from connecting to the last byte of the reply.
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
        self._cancel = threading.Event()  # set by an interrupted batch: every worker stops trying
        self._inflight: set[_Watched] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_local", "_lock", "_cancel", "_inflight"):  # none pickles; rebuilt on load
            del state[name]
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
            session = requests.Session()
            session.mount("http://", _DeadlineAdapter())
            session.mount("https://", _DeadlineAdapter())
            self._local.session = session
        return self._local.session

    @property
    def identity(self) -> str:
        return f"openai:{self.model}@{public_url(self.base_url)}"

    # -- HTTP ------------------------------------------------------------------------------

    def _key(self) -> str:
        return os.environ.get(self.api_key_env, "").strip()

    def _redact(self, text: str) -> str:
        """Remove the key and the URL's secrets from text that came back from the server, should it echo them."""
        for secret in [self._key(), *url_secrets(self.base_url)]:
            text = text.replace(secret, "***") if secret else text
        return text

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
        url = endpoint(self.base_url)
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if self._cancel.is_set():
                raise _Cancelled()
            if attempt:
                self._count("retries")
            self._count("requests")
            retry_after = None
            watched = _Watched()
            try:
                # One deadline for the attempt, status line and headers included: the watchdog cuts the socket.
                with self._watch(watched):
                    # Streamed, so that the body is read under the same deadline and the size cap.
                    resp = self._session.post(url, json=body, headers=self._headers(), timeout=self.timeout_s,
                                              stream=True)
                    content = self._read(resp) if resp.status_code == 200 else None
            except (
                requests.Timeout,
                requests.ConnectionError,
                requests.exceptions.ChunkedEncodingError,
            ) as err:
                if self._cancel.is_set():
                    raise _Cancelled() from None
                # The exception text may echo request details: its type says enough.
                last = "Timeout" if watched.expired else type(err).__name__
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
                if self._cancel.wait(delay):  # an interrupted batch ends the wait at once
                    raise _Cancelled()
        raise _Failed(f"gave up after {self.max_retries + 1} attempts: {last}")

    @contextlib.contextmanager
    def _watch(self, watched: _Watched):
        """Cut ``watched``'s connections when ``timeout_s`` has passed (or the batch is interrupted)."""

        def expire() -> None:
            watched.expired = True
            watched.cut()

        timer = threading.Timer(self.timeout_s, expire)
        timer.daemon = True
        _current.watched = watched
        with self._lock:
            self._inflight.add(watched)
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            _current.watched = None
            with self._lock:
                self._inflight.discard(watched)

    def cancel(self) -> None:
        """Stop every request of this judge now: no new attempt, no wait, in-flight connections cut."""
        self._cancel.set()
        with self._lock:
            inflight = list(self._inflight)
        for watched in inflight:
            watched.cut()

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
        pool = ThreadPoolExecutor(min(self.concurrency, len(prompts)))
        try:
            return list(pool.map(lambda p: self.judge_one(p, mode, labels), prompts))
        except BaseException:  # Ctrl+C: the workers would otherwise go on sending and retrying
            self.cancel()
            pool.shutdown(wait=True, cancel_futures=True)  # quick now: no wait or read is left to block
            self._cancel.clear()
            raise
        finally:
            pool.shutdown(wait=True)
