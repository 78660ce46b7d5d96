"""Concept judges: how strongly a text expresses a concept, in [0, 1], behind one small interface.

``judge.score(concept, texts) -> list[float | None]``; ``None`` marks a failed judgement, which callers drop
from averages (as the paper drops failed gpt-4o-mini calls) and count.

``PlantedJudge``  ground truth for a corpus with planted concepts (such as the embedded world's): the
                  fraction of a text's words that belong to the concept's planted vocabulary.
``HFJudge``       a local transformers causal LM asked a rubric prompt; the score is read from its next-token
                  probabilities of a "yes" and a "no" token (no free-text parsing).
``OpenAIJudge``   any OpenAI-compatible chat-completions endpoint in JSON mode (docs/reference.md §4–5: the
                  score is ``{"score": 0..100}`` / 100); timeouts, retries with exponential backoff, and a
                  JSON cache on disk so a re-run costs nothing.
"""
from __future__ import annotations

import collections
import datetime
import email.utils
import functools
import hashlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import Callable, Mapping, Protocol, Sequence

import torch

from dlmscope.util import atomic

__all__ = ["Judge", "PlantedJudge", "HFJudge", "OpenAIJudge", "JudgeUnreachable", "JudgeRejected",
           "RUBRIC", "planted_vocabulary"]

#: The rubric every model judge is asked (the concept and the text are filled in).
RUBRIC = ("Rate how strongly the text expresses the concept. Concept: {concept}. Text: {text}. "
          "Does the text express the concept?")


class Judge(Protocol):
    def score(self, concept: str, texts: Sequence[str]) -> list[float | None]: ...


class JudgeUnreachable(RuntimeError):
    """The judge's endpoint could not be reached at all (every retry failed to connect)."""


class JudgeRejected(RuntimeError):
    """The judge's endpoint refused the requests themselves (HTTP 401 / 403 / 404: a wrong key, no access, a
    wrong base URL or model); raised at the first such answer, never retried."""


#: HTTP statuses that no retry can fix: raised as :class:`JudgeRejected` at once
REJECTED = (401, 403, 404)
#: the 4xx statuses worth retrying (request timeout, rate limit); every other 4xx fails the call at once
RETRIED_4XX = (408, 429)
LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: bytes read from the socket at a time
CHUNK = 1 << 16


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would re-send the request, and its ``Authorization`` header (the API key),
    to wherever the ``Location`` points. The 3xx surfaces as an ``HTTPError``: a failed call."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Deadline:
    """A wall-clock limit on one request: when it passes, the sockets it watches are shut down, which ends any
    read or write blocked on them (however slowly the server drips its reply)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            # the plain socket's shutdown, also for a TLS socket: it must not touch the TLS state another thread
            # is reading through
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:                                       # already closed
            pass

    def cancel(self) -> None:
        self._timer.cancel()


class _DeadlineRequest(urllib.request.Request):
    """A request carrying its :class:`_Deadline`, for the connections below."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline


def _watched(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
    """``base`` whose socket, once connected, is watched by the request's :class:`_Deadline`."""

    class Watched(base):
        def __init__(self, *args, deadline: _Deadline, **kwargs):
            super().__init__(*args, **kwargs)
            self.deadline = deadline

        def connect(self):
            super().connect()
            self.deadline.watch(self.sock)

    Watched.__name__ = Watched.__qualname__ = f"Watched{base.__name__}"
    return Watched


_WatchedHTTP = _watched(http.client.HTTPConnection)
_WatchedHTTPS = _watched(http.client.HTTPSConnection)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    """Opens ``http://`` requests on a connection their deadline watches."""

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, deadline=req.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    """Opens ``https://`` requests on a connection their deadline watches, with the default TLS checks (the
    context is made at the first request: loading the CA store costs time a run without a judge need not pay)."""

    context: ssl.SSLContext | None = None

    def https_open(self, req):
        if self.context is None:
            self.context = ssl.create_default_context()
            self.context.set_alpn_protocols(["http/1.1"])
        return self.do_open(functools.partial(_WatchedHTTPS, deadline=req.deadline), req, context=self.context)


_OPENER = urllib.request.build_opener(_NoRedirect, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)


class _Failed(Exception):
    """One attempt failed for ``reason`` (a short phrase, counted in ``OpenAIJudge.failure_reasons``)."""


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (delay-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def planted_vocabulary(concepts: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    """``{concept: its words, lower-cased}`` of the planted ``concepts`` (name -> words; the embedded world's are
    ``dlmscope.world.CONCEPTS``). Raises ``ValueError`` unless every concept has at least one word."""
    if not isinstance(concepts, Mapping) or not concepts:
        raise ValueError("the planted concepts must be a non-empty mapping of concept name -> its words (the "
                         f"embedded world's: concepts=dlmscope.world.CONCEPTS), got {concepts!r}")
    for name, words in concepts.items():
        if isinstance(words, str) or not words or not all(isinstance(w, str) for w in words):
            raise ValueError(f"planted concept {name!r} needs a non-empty list of words, got {words!r}")
    return {name: {w.lower() for w in words} for name, words in concepts.items()}


class PlantedJudge:
    """Fraction of each text's words in the concept's planted vocabulary (``concepts``: name -> words, e.g. the
    embedded world's ``dlmscope.world.CONCEPTS``)."""

    def __init__(self, *, concepts: Mapping[str, Sequence[str]]):
        self.vocab = planted_vocabulary(concepts)

    def score(self, concept: str, texts: Sequence[str]) -> list[float | None]:
        if concept not in self.vocab:
            raise ValueError(f"unknown planted concept {concept!r}; expected one of {sorted(self.vocab)}")
        words = self.vocab[concept]
        out: list[float | None] = []
        for text in texts:
            toks = [w for w in text.lower().split() if not (w.startswith("[") and w.endswith("]"))]
            out.append(sum(w in words for w in toks) / len(toks) if toks else 0.0)
        return out


class HFJudge:
    """A local causal LM judge: ``P(yes) / (P(yes) + P(no))`` for the next token after :data:`RUBRIC`.
    ``yes`` / ``no`` are single tokens of the judge's tokenizer."""

    def __init__(self, model, tokenizer, *, yes: str = " yes", no: str = " no", template: str = RUBRIC,
                 device=None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.ids = []
        for word in (yes, no):
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"judge answer {word!r} is {len(ids)} tokens for this tokenizer; it must be one")
            self.ids.append(ids[0])
        self.device = device or next(model.parameters()).device

    @torch.no_grad()
    def score(self, concept: str, texts: Sequence[str]) -> list[float | None]:
        out: list[float | None] = []
        for text in texts:
            prompt = self.template.format(concept=concept, text=text)
            ids = torch.tensor([self.tokenizer(prompt)["input_ids"]], device=self.device)
            logits = self.model(input_ids=ids).logits[0, -1].float()
            out.append(logits[self.ids].softmax(-1)[0].item())
        return out


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint. ``base_url`` / ``model`` / ``api_key`` default to
    ``$OPENAI_BASE_URL`` / ``$DLMSCOPE_JUDGE_MODEL`` / ``$OPENAI_API_KEY``. Each text is one request; the reply
    must be JSON ``{"score": 0..100}``. Replies are cached in ``cache_path`` (JSON, written atomically) by a
    hash of (base URL, model, concept, text); ``calls`` counts the calls made (cache misses), ``failures`` those
    that failed after ``retries`` and ``failure_reasons`` why (:meth:`stats` sums them up).

    The key is required: with no ``api_key`` argument and an unset or empty ``$OPENAI_API_KEY`` the constructor
    raises ``ValueError`` naming ``OPENAI_API_KEY``; pass ``api_key=""`` explicitly for a server that needs none.
    Redirects are never followed (the key would travel to the redirect's host): a 3xx is a failed call. HTTP
    401 / 403 / 404 raise :class:`JudgeRejected` at once. A plain ``http://`` base URL to a host that is not
    loopback warns once (``UserWarning``): the key would cross the network in clear text.

    Each request waits at most ``timeout`` seconds for any one step (connecting, each read) and ``deadline``
    seconds in all; a reply over ``max_reply_bytes`` is refused. Failed attempts are retried after
    ``backoff · 2^attempt`` seconds, or the server's ``Retry-After`` when longer (one over ``max_retry_after``
    ends the call); a 4xx other than 408 / 429 is not retried. ``sleep`` waits between attempts."""

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 1.0, cache_path: str | None = None,
                 deadline: float = 120.0, max_reply_bytes: int = 4 << 20, max_retry_after: float = 60.0,
                 sleep: Callable[[float], object] = time.sleep):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.model = model or os.environ.get("DLMSCOPE_JUDGE_MODEL") or "gpt-4o-mini"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        if api_key is None and not self.api_key:
            raise ValueError("the OpenAI judge needs an API key: set OPENAI_API_KEY (or pass api_key=; api_key=\"\" "
                             f"for an endpoint that needs none), for {self.base_url}")
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme == "http" and url.hostname not in LOOPBACK:
            warnings.warn(f"judge endpoint {self.base_url} is plain http to a non-loopback host: the API key and "
                          "the texts travel unencrypted", UserWarning, stacklevel=2)
        if not (retries >= 1 and timeout > 0 and deadline > 0 and max_reply_bytes >= 1 and max_retry_after >= 0):
            raise ValueError("need retries >= 1, timeout > 0, deadline > 0, max_reply_bytes >= 1 and "
                             f"max_retry_after >= 0; got {retries}, {timeout}, {deadline}, {max_reply_bytes}, "
                             f"{max_retry_after}")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.deadline, self.max_reply_bytes, self.max_retry_after = deadline, max_reply_bytes, max_retry_after
        self.sleep = sleep
        self.cache_path = cache_path
        self.cache: dict[str, object] = self._load_cache(cache_path) if cache_path else {}
        self.cache_unwritable = False
        self.calls = self.failures = self.requests = 0
        self.failure_reasons: collections.Counter[str] = collections.Counter()

    @staticmethod
    def _load_cache(path: str) -> dict[str, object]:
        """The cache file's entries (none when it does not exist); ``ValueError`` naming it when it is not a
        cache this class wrote."""
        if not os.path.exists(path):
            return {}
        try:
            cache = atomic.read_json(path, "judge cache is unreadable")
        except (ValueError, OSError) as exc:
            raise ValueError(f"{exc if isinstance(exc, ValueError) else f'{path}: judge cache is unreadable ({exc})'}"
                             "; delete it or use another --out") from None
        if not isinstance(cache, dict) or not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in cache.values()):
            raise ValueError(f"judge cache {path} is not a judge cache (a JSON object of scores and explanations); "
                             "delete it or use another --out")
        return cache

    def stats(self) -> dict:
        """``{"calls", "failed", "requests", "reasons": {reason: failed calls}}`` so far."""
        return {"calls": self.calls, "failed": self.failures, "requests": self.requests,
                "reasons": dict(self.failure_reasons)}

    def _open(self, req: _DeadlineRequest):
        return _OPENER.open(req, timeout=min(self.timeout, self.deadline))

    def _request(self, path: str, body: bytes | None = None) -> _DeadlineRequest:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        return _DeadlineRequest(f"{self.base_url}{path}", data=body, method="POST" if body is not None else "GET",
                                headers=headers, deadline=_Deadline(self.deadline))

    def check(self) -> None:
        """One ``GET {base_url}/models`` before a long run, so that a dead endpoint or a refused key stops it
        before the work: :class:`JudgeUnreachable` when it cannot connect, :class:`JudgeRejected` on HTTP 401 /
        403. Any other answer passes (not every compatible server lists its models)."""
        req = self._request("/models")
        try:
            with self._open(req) as resp:
                resp.read(CHUNK)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                raise JudgeRejected(f"judge endpoint {self.base_url} answered HTTP {exc.code} ({exc.reason}): "
                                    "check OPENAI_API_KEY and the base URL") from None
        except urllib.error.URLError as exc:
            if not req.deadline.expired:
                raise JudgeUnreachable(f"judge endpoint {self.base_url} unreachable ({exc.reason})") from None
        except (http.client.HTTPException, OSError):
            pass                                              # connected: the chat requests will tell
        finally:
            req.deadline.cancel()

    def _read(self, resp) -> bytes:
        """The reply's body, at most ``max_reply_bytes`` of it (else a failed attempt)."""
        too_big = _Failed(f"reply over {self.max_reply_bytes} bytes")
        declared = resp.headers.get("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > self.max_reply_bytes:
            raise too_big
        data = bytearray()
        while chunk := resp.read(CHUNK):
            data += chunk
            if len(data) > self.max_reply_bytes:
                raise too_big
        if resp.length:                                       # the connection closed before Content-Length bytes
            raise http.client.IncompleteRead(bytes(data), resp.length)
        return bytes(data)

    def _post(self, system: str, user: str) -> dict:
        """One chat-completions request in JSON mode; the reply's content parsed as JSON."""
        body = json.dumps({
            "model": self.model, "temperature": 0, "response_format": {"type": "json_object"},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }).encode()
        req = self._request("/chat/completions", body)
        self.requests += 1
        late = _Failed(f"no complete reply within the {self.deadline:g} s deadline")
        try:
            with self._open(req) as resp:
                raw = self._read(resp)
        except (http.client.HTTPException, OSError) as exc:
            if req.deadline.expired:                          # the deadline cut the connection
                raise late from exc
            raise
        finally:
            req.deadline.cancel()
        if req.deadline.expired:
            raise late
        reply = json.loads(raw)
        return json.loads(reply["choices"][0]["message"]["content"])

    def chat_json(self, system: str, user: str, parse: Callable[[dict], object]):
        """``parse(reply JSON)`` of one request, retried with exponential backoff; None (counted in ``failures``,
        the last attempt's reason in ``failure_reasons``) when every attempt failed — a bad or cut-short reply, a
        timeout, the deadline, a reply too big, a malformed one — or at once on a redirect (never followed: the
        key would travel with it) and on a 4xx other than 408 / 429; :class:`JudgeUnreachable` when no attempt
        could connect; :class:`JudgeRejected` at once, without retrying, on HTTP 401 / 403 / 404. The explainers
        of :mod:`dlmscope.interp.autointerp` use it too."""
        self.calls += 1
        connect_errors, reason = 0, ""
        for attempt in range(self.retries):
            wait = self.backoff * 2 ** attempt
            try:
                return parse(self._post(system, user))
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code in REJECTED:                      # no retry can fix a refused key, model or URL
                    raise JudgeRejected(f"judge endpoint {self.base_url} answered HTTP {exc.code} "
                                        f"({exc.reason}): check OPENAI_API_KEY, the base URL and the model "
                                        f"{self.model!r}") from None
                reason = f"HTTP {exc.code}"
                if 300 <= exc.code < 400:                     # a redirect (never followed) answers the same again
                    reason += " (a redirect, not followed)"
                    break
                if 400 <= exc.code < 500 and exc.code not in RETRIED_4XX:   # the same request fails the same way
                    break
                after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                if after is not None:
                    if after > self.max_retry_after:
                        reason += f", Retry-After {after:g} s is over the {self.max_retry_after:g} s bound"
                        break
                    wait = max(wait, after)
            except urllib.error.URLError as exc:              # connecting or sending the request failed
                connect_errors += 1
                reason = f"unreachable ({exc.reason})"
            except _Failed as exc:
                reason = str(exc)
            except http.client.HTTPException as exc:
                reason = f"bad HTTP reply ({type(exc).__name__})"
            except TimeoutError:
                reason = "timed out"
            except OSError as exc:
                reason = f"connection error ({type(exc).__name__})"
            except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError) as exc:
                reason = f"malformed reply ({type(exc).__name__})"
            if attempt + 1 < self.retries:
                self.sleep(wait)
        if connect_errors == self.retries:
            raise JudgeUnreachable(f"judge endpoint {self.base_url} unreachable after {self.retries} attempts")
        self.failures += 1
        self.failure_reasons[reason] += 1
        return None

    def _one(self, concept: str, text: str) -> float | None:
        def parse(content: dict) -> float:
            score = float(content["score"])
            if not 0 <= score <= 100:
                raise ValueError(f"score {score} outside 0..100")
            return score / 100

        return self.chat_json("You rate texts. Reply with JSON {\"score\": 0..100}.",
                              RUBRIC.format(concept=concept, text=text), parse)

    def cached(self, key_parts, compute: Callable[[], object]):
        """The cached value for ``key_parts`` (with the base URL and the model: another endpoint serving the
        same model name is another judge), computing and storing it if absent; a None result (a failed call) is
        not cached. A cache file that cannot be written warns once and the cache stays in memory: losing the
        answers a run has paid for to a full disk would be worse."""
        key = hashlib.sha256(json.dumps([self.base_url, self.model, *key_parts]).encode()).hexdigest()
        if key not in self.cache:
            value = compute()
            if value is None:
                return None
            self.cache[key] = value
            if self.cache_path and not self.cache_unwritable:
                try:
                    # the cache may live in an output folder the run has not made yet (``dashboard --out``)
                    os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
                    atomic.write_json(self.cache_path, self.cache)
                except OSError as exc:
                    self.cache_unwritable = True
                    warnings.warn(f"judge cache {self.cache_path} could not be written ({exc}); the answers stay "
                                  "in memory for this run only", UserWarning, stacklevel=2)
        return self.cache[key]

    def score(self, concept: str, texts: Sequence[str]) -> list[float | None]:
        return [self.cached([concept, text], lambda text=text: self._one(concept, text)) for text in texts]
