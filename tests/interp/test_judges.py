"""dlmscope.interp.judges: the planted judge, a local HF judge, and an OpenAI-compatible judge against a real HTTP
server on loopback (the standard library's http.server speaking the chat-completions shape)."""
from __future__ import annotations

import json
import socket
import time
import warnings

import pytest
import torch

from dlmscope.interp.autointerp import PlantedExplainer
from dlmscope.interp.judges import HFJudge, JudgeRejected, JudgeUnreachable, OpenAIJudge, PlantedJudge
from dlmscope.world import CONCEPTS

from tests.helpers.chat_server import (BadStatusLineHandler, ChatHandler, DripHandler, HugeHandler,
                                       IncompleteReadHandler, NestedJSONHandler, RecordingScoreHandler, ScriptHandler,
                                       StatusHandler, serving)


def test_planted_judge_counts_the_concepts_words():
    j = PlantedJudge(concepts=CONCEPTS)
    assert j.score("colour", ["the red cat", "blue green", "[BOS] the [EOS]", ""]) == [1 / 3, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown planted concept 'colours'"):
        j.score("colours", ["red"])


def test_planted_judge_and_explainer_need_the_concepts():
    for planted in (PlantedJudge, PlantedExplainer):
        with pytest.raises(TypeError, match="concepts"):
            planted()
        with pytest.raises(ValueError, match="non-empty mapping of concept name"):
            planted(concepts={})
        with pytest.raises(ValueError, match="planted concept 'food' needs a non-empty list of words"):
            planted(concepts={"food": "bread"})
        assert planted(concepts={"food": ["Bread"]}).vocab == {"food": {"bread"}}


def test_hf_judge_reads_the_yes_no_probabilities():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlmscope.world import TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    j = HFJudge(model, tok, yes="good", no="bad", template="{concept} : {text}")
    got = j.score("colour", ["the red cat"])[0]
    ids = torch.tensor([tok("colour : the red cat")["input_ids"]])
    last = model(input_ids=ids).logits[0, -1]
    y, n = tok.convert_tokens_to_ids(["good", "bad"])
    assert got == pytest.approx(torch.stack([last[y], last[n]]).softmax(0)[0].item(), abs=1e-6)
    with pytest.raises(ValueError, match="must be one"):
        HFJudge(model, tok, yes="very good")


class _ScoreHandler(ChatHandler):
    """Score 90 if the concept's name is in the text, else 10; HTTP 500 for texts holding 'fail'; a non-JSON
    reply for texts holding 'garbled'."""

    def content(self, body):
        user = body["messages"][-1]["content"]
        text = user.split("Text: ", 1)[1]
        concept = user.split("Concept: ", 1)[1].split(".", 1)[0]
        if "fail" in text:
            return None
        return "not json" if "garbled" in text else json.dumps({"score": 90 if concept in text else 10})


@pytest.fixture()
def server():
    with serving(_ScoreHandler) as srv:
        yield srv


def test_openai_judge_scores_caches_and_drops_failures(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    cache = tmp_path / "judge.json"
    j = OpenAIJudge(url, "tiny", "k", retries=2, backoff=0.0, cache_path=str(cache))
    got = j.score("red", ["a red cat", "a blue cat", "fail here", "garbled reply"])
    assert got == [0.9, 0.1, None, None] and j.failures == 2
    first = server.seen[0]
    assert first["model"] == "tiny" and first["temperature"] == 0 and first["response_format"]["type"] == "json_object"
    # failed calls were retried (2 attempts each); a second judge on the same cache asks nothing new
    n = len(server.seen)
    assert n == 2 + 2 * 2
    again = OpenAIJudge(url, "tiny", "k", retries=2, backoff=0.0, cache_path=str(cache))
    assert again.score("red", ["a red cat", "a blue cat"]) == [0.9, 0.1] and len(server.seen) == n


def test_openai_judge_unreachable_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                          # nothing listens here once closed
    j = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", "k", retries=2, backoff=0.0, timeout=2)
    with pytest.raises(JudgeUnreachable, match="unreachable after 2 attempts"):
        j.score("red", ["a red cat"])


def test_judge_cache_in_a_folder_not_made_yet(server, tmp_path):
    """Issue 21.3: the cache's folder (``dashboard --out``) need not exist before the first good answer."""
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    cache = tmp_path / "not" / "made" / "judge_cache.json"
    j = OpenAIJudge(url, "tiny", "k", retries=1, backoff=0.0, cache_path=str(cache))
    assert j.score("red", ["a red cat"]) == [0.9]
    assert cache.is_file() and len(json.loads(cache.read_text())) == 1


def test_redirect_is_a_failed_call_and_the_key_stays_home():
    """Issue 21.5: a 302 from the API to another host is not followed (the key is never re-sent there) and
    counts as a failed call, not a score."""
    with serving(RecordingScoreHandler) as far, serving(StatusHandler) as near:
        near.status = 302
        near.location = f"http://127.0.0.1:{far.server_address[1]}/v1/chat/completions"
        url = f"http://127.0.0.1:{near.server_address[1]}/v1"
        j = OpenAIJudge(url, "tiny", "secret-key", retries=2, backoff=0.0)
        assert j.score("red", ["a red cat"]) == [None]
        assert far.seen == [] and far.auth == []
        assert j.failures == 1 and j.cache == {} and len(near.seen) >= 1


def test_plain_http_to_a_remote_host_warns():
    with pytest.warns(UserWarning, match="plain http"):
        OpenAIJudge("http://example.invalid/v1", "m", "k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for url in ("http://127.0.0.1:9/v1", "http://localhost:9/v1", "http://[::1]:9/v1",
                    "https://example.invalid/v1"):
            OpenAIJudge(url, "m", "k")


def test_rejected_key_raises_at_once():
    """Issue 21.7: 401/403/404 are not retried and not a silent "no explanation": one clear error naming the
    status and the endpoint, never the key."""
    for status in (401, 403, 404):
        with serving(StatusHandler) as srv:
            srv.status = status
            url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
            j = OpenAIJudge(url, "m", "secret-key", retries=3, backoff=0.0)
            with pytest.raises(JudgeRejected, match=f"HTTP {status}") as info:
                j.score("red", ["a red cat"])
            assert url in str(info.value) and "secret-key" not in str(info.value)
            assert len(srv.seen) == 1 and srv.auth == ["Bearer secret-key"]


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIJudge("https://example.invalid/v1", "m")
    monkeypatch.setenv("OPENAI_API_KEY", "")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIJudge("https://example.invalid/v1", "m")
    assert OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key="").api_key == ""   # explicit: a keyless server
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert OpenAIJudge("https://example.invalid/v1", "m").api_key == "k"


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def _fails_once_per_attempt(handler, retries=2, **server_attrs) -> OpenAIJudge:
    """A judge asked once against ``handler``: the call fails (counted, not raised) after ``retries`` requests."""
    with serving(handler) as srv:
        for name, value in server_attrs.items():
            setattr(srv, name, value)
        j = OpenAIJudge(_url(srv), "m", "k", retries=retries, backoff=0.0, timeout=2)
        assert j.score("red", ["a red cat"]) == [None]
        assert len(srv.seen) == retries
    assert j.failures == 1 and j.calls == 1 and j.cache == {}
    return j


def test_21_8_incomplete_read_is_a_counted_failure():
    j = _fails_once_per_attempt(IncompleteReadHandler)
    assert list(j.failure_reasons) == ["bad HTTP reply (IncompleteRead)"]


def test_21_8_bad_status_line_is_a_counted_failure():
    j = _fails_once_per_attempt(BadStatusLineHandler)
    assert list(j.failure_reasons) == ["bad HTTP reply (BadStatusLine)"]


def test_21_8_deeply_nested_json_is_a_counted_failure():
    for where in ("body", "content"):
        j = _fails_once_per_attempt(NestedJSONHandler, where=where)
        assert list(j.failure_reasons) == ["malformed reply (RecursionError)"]


def test_21_8_read_timeout_is_a_counted_failure_not_unreachable():
    """A server that connects, sends its headers and then stalls past ``timeout`` answered: a failed call,
    never :class:`JudgeUnreachable`."""
    with serving(DripHandler) as srv:
        srv.interval = 5.0
        j = OpenAIJudge(_url(srv), "m", "k", retries=2, backoff=0.0, timeout=0.3)
        assert j.score("red", ["a red cat"]) == [None]
        assert len(srv.seen) == 2
    assert j.failures == 1 and list(j.failure_reasons) == ["timed out"]


def test_21_8_a_dripping_server_is_cut_at_the_deadline():
    """One byte every 0.5 s never trips a 2 s read timeout; the per-request deadline ends the call, whether the
    body or the status line and headers are dripped."""
    for drip_headers in (False, True):
        with serving(DripHandler) as srv:
            srv.drip_headers = drip_headers
            j = OpenAIJudge(_url(srv), "m", "k", retries=1, backoff=0.0, timeout=2, deadline=1.0)
            start = time.monotonic()
            assert j.score("red", ["a red cat"]) == [None]
            assert time.monotonic() - start < 4.0                   # the deadline, not the server, ended it
        assert j.failures == 1 and list(j.failure_reasons) == ["no complete reply within the 1 s deadline"]


def test_21_8_a_huge_reply_is_refused():
    for declared in (True, False):
        with serving(HugeHandler) as srv:
            srv.size, srv.declare_length = 300_000, declared
            j = OpenAIJudge(_url(srv), "m", "k", retries=1, backoff=0.0, max_reply_bytes=100_000)
            assert j.score("red", ["a red cat"]) == [None]
            small = OpenAIJudge(_url(srv), "m", "k", retries=1, backoff=0.0, max_reply_bytes=400_000)
            assert small.score("red", ["a red cat"]) == [0.5]           # the same reply under the cap is read
        assert j.failures == 1 and list(j.failure_reasons) == ["reply over 100000 bytes"]


def test_21_8_retry_after_is_honoured_and_bounded():
    waits = []
    with serving(ScriptHandler) as srv:
        srv.script = [(429, {"Retry-After": "7"}), (200, {})]
        j = OpenAIJudge(_url(srv), "m", "k", retries=3, backoff=0.0, sleep=waits.append)
        assert j.score("red", ["a red cat"]) == [0.5] and len(srv.seen) == 2
    assert waits == [7.0]
    waits.clear()
    with serving(ScriptHandler) as srv:                     # longer than the bound: no retry, a failed call
        srv.script = [(503, {"Retry-After": "3600"}), (200, {})]
        j = OpenAIJudge(_url(srv), "m", "k", retries=3, backoff=0.0, max_retry_after=60, sleep=waits.append)
        assert j.score("red", ["a red cat"]) == [None] and len(srv.seen) == 1
    assert waits == [] and list(j.failure_reasons) == ["HTTP 503, Retry-After 3600 s is over the 60 s bound"]


def test_21_8_no_retries_on_4xx_but_408_and_429():
    for status, requests in ((400, 1), (409, 1), (422, 1), (408, 3), (429, 3), (500, 3), (503, 3)):
        with serving(ScriptHandler) as srv:
            srv.script = [(status, {})]
            j = OpenAIJudge(_url(srv), "m", "k", retries=3, backoff=0.0)
            assert j.score("red", ["a red cat"]) == [None]
            assert len(srv.seen) == requests, status
        assert j.failure_reasons == {f"HTTP {status}": 1}


def test_21_8_cache_key_includes_the_base_url(tmp_path):
    """Two endpoints serving the same model name are different judges: one's cached answers are not the other's."""
    cache = str(tmp_path / "judge.json")
    with serving(_ScoreHandler) as a, serving(ScriptHandler) as b:
        b.script = [(200, {})]
        assert OpenAIJudge(_url(a), "m", "k", cache_path=cache).score("red", ["a red cat"]) == [0.9]
        assert OpenAIJudge(_url(b), "m", "k", cache_path=cache).score("red", ["a red cat"]) == [0.5]
        assert len(b.seen) == 1
        assert OpenAIJudge(_url(a), "m", "k", cache_path=cache).score("red", ["a red cat"]) == [0.9]
        assert len(a.seen) == 1


def test_21_17_a_corrupt_judge_cache_names_the_file(tmp_path):
    cache = tmp_path / "judge_cache.json"
    for text in ("{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000, '{"k": [1]}', "\xff\xfe"):
        cache.write_text(text)
        with pytest.raises(ValueError, match="judge_cache.json") as info:
            OpenAIJudge("http://127.0.0.1:9/v1", "m", "k", cache_path=str(cache))
        assert str(cache) in str(info.value)


def test_21_7_the_judge_counts_its_calls_and_why_they_failed(server):
    j = OpenAIJudge(_url(server), "tiny", "k", retries=2, backoff=0.0)
    assert j.score("red", ["a red cat", "fail here", "garbled", "fail again"]) == [0.9, None, None, None]
    assert j.stats() == {"calls": 4, "failed": 3, "requests": 7,
                         "reasons": {"HTTP 500": 2, "malformed reply (JSONDecodeError)": 1}}


def test_21_12_check_stops_a_dead_endpoint_or_a_refused_key_before_the_work():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeUnreachable, match=f"127.0.0.1:{port}"):
        OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", "k", timeout=2).check()
    with serving(StatusHandler) as srv:
        srv.status = 401
        with pytest.raises(JudgeRejected, match="HTTP 401"):
            OpenAIJudge(_url(srv), "m", "secret-key").check()
        assert srv.seen == ["/v1/models"] and srv.auth == ["Bearer secret-key"]
    for status in (200, 404, 500):                          # not every compatible server lists its models
        with serving(StatusHandler) as srv:
            srv.status = status
            OpenAIJudge(_url(srv), "m", "k").check()
    with serving(_ScoreHandler) as srv:                      # no GET at all (501)
        OpenAIJudge(_url(srv), "m", "k").check()


def test_21_8_an_unwritable_cache_warns_once_and_the_judging_goes_on(server, tmp_path):
    """Saving the cache is a saving, not the result: a cache that cannot be written (here its folder is a file)
    warns once, and the answers still come back (kept in memory)."""
    (tmp_path / "file").write_text("")
    j = OpenAIJudge(_url(server), "tiny", "k", retries=1, backoff=0.0,
                    cache_path=str(tmp_path / "file" / "judge.json"))
    with pytest.warns(UserWarning, match="could not be written") as record:
        assert j.score("red", ["a red cat", "a blue cat"]) == [0.9, 0.1]
    assert len(record) == 1 and len(j.cache) == 2
