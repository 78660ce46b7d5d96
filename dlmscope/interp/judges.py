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

import hashlib
import json
import os
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
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would re-send the request, and its ``Authorization`` header (the API key),
    to wherever the ``Location`` points. The 3xx surfaces as an ``HTTPError``: a failed call."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


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
    hash of (model, concept, text); ``failures`` counts judgements that failed after ``retries``.

    The key is required: with no ``api_key`` argument and an unset or empty ``$OPENAI_API_KEY`` the constructor
    raises ``ValueError`` naming ``OPENAI_API_KEY``; pass ``api_key=""`` explicitly for a server that needs none.
    Redirects are never followed (the key would travel to the redirect's host): a 3xx is a failed call. HTTP
    401 / 403 / 404 raise :class:`JudgeRejected` at once. A plain ``http://`` base URL to a host that is not
    loopback warns once (``UserWarning``): the key would cross the network in clear text."""

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 1.0, cache_path: str | None = None):
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
        if retries < 1 or timeout <= 0:
            raise ValueError(f"retries must be >= 1 and timeout > 0, got {retries}, {timeout}")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.cache_path = cache_path
        self.cache: dict[str, object] = {}
        if cache_path and os.path.exists(cache_path):
            with open(cache_path) as f:
                self.cache = json.load(f)
        self.failures = 0
        self.requests = 0

    def _post(self, system: str, user: str) -> dict:
        """One chat-completions request in JSON mode; the reply's content parsed as JSON."""
        body = json.dumps({
            "model": self.model, "temperature": 0, "response_format": {"type": "json_object"},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }).encode()
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        self.requests += 1
        with _OPENER.open(req, timeout=self.timeout) as resp:
            reply = json.load(resp)
        return json.loads(reply["choices"][0]["message"]["content"])

    def chat_json(self, system: str, user: str, parse: Callable[[dict], object]):
        """``parse(reply JSON)`` of one request, retried with exponential backoff; None (counted in
        ``failures``) when every attempt failed or was malformed, or at once on a redirect (never followed: the
        key would travel with it); :class:`JudgeUnreachable` when no attempt could connect; :class:`JudgeRejected`
        at once, without retrying, on HTTP 401 / 403 / 404. The explainers of :mod:`dlmscope.interp.autointerp`
        use it too."""
        connect_errors = 0
        for attempt in range(self.retries):
            try:
                return parse(self._post(system, user))
            except urllib.error.HTTPError as exc:
                if exc.code in REJECTED:                      # no retry can fix a refused key, model or URL
                    raise JudgeRejected(f"judge endpoint {self.base_url} answered HTTP {exc.code} "
                                        f"({exc.reason}): check OPENAI_API_KEY, the base URL and the model "
                                        f"{self.model!r}") from None
                if 300 <= exc.code < 400:                     # a redirect (never followed) answers the same again
                    break
                # any other answer of the server: a failed call, retried
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                connect_errors += 1
            except (KeyError, IndexError, TypeError, ValueError):
                pass                                          # malformed reply: retried, then dropped
            if attempt + 1 < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        if connect_errors == self.retries:
            raise JudgeUnreachable(f"judge endpoint {self.base_url} unreachable after {self.retries} attempts")
        self.failures += 1
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
        """The cached value for ``key_parts`` (with the model), computing and storing it if absent; a None
        result (a failed call) is not cached."""
        key = hashlib.sha256(json.dumps([self.model, *key_parts]).encode()).hexdigest()
        if key not in self.cache:
            value = compute()
            if value is None:
                return None
            self.cache[key] = value
            if self.cache_path:
                # the cache may live in an output folder the run has not made yet (``dashboard --out``)
                os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
                atomic.write_json(self.cache_path, self.cache)
        return self.cache[key]

    def score(self, concept: str, texts: Sequence[str]) -> list[float | None]:
        return [self.cached([concept, text], lambda text=text: self._one(concept, text)) for text in texts]
