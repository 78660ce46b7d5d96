"""A chat-completions endpoint on loopback for the judge and explainer tests: the standard library's
http.server, a subclass deciding each reply's content (no mocked client).

Besides the well-behaved :class:`ChatHandler`, hostile servers: a reply cut short (:class:`IncompleteReadHandler`),
a broken status line (:class:`BadStatusLineHandler`), deeply nested JSON (:class:`NestedJSONHandler`), a reply
dripped a byte at a time (:class:`DripHandler`), a huge reply (:class:`HugeHandler`) and scripted statuses with
headers such as ``Retry-After`` (:class:`ScriptHandler`). Each is bounded in time: a handler that waits does so
on ``server.closing``, which :func:`serving` sets before shutting down."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatHandler(BaseHTTPRequestHandler):
    """Subclasses implement ``content(body) -> str | int | None`` (an int: answer that HTTP status, no body;
    None: HTTP 500); requests are kept in ``server.seen``."""

    def content(self, body: dict) -> str | int | None:
        raise NotImplementedError

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        content = self.content(body)
        if content is None or isinstance(content, int):
            self.send_response(500 if content is None else content)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@contextmanager
def serving(handler: type[ChatHandler]):
    """The running server (``server.server_address``, ``server.seen``), shut down afterwards (``server.closing``
    is set first, ending any handler still waiting)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.seen, srv.auth = [], []
    srv.closing = threading.Event()
    # a short poll interval: shutdown() waits for the serving loop to look
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield srv
    finally:
        srv.closing.set()
        srv.shutdown()
        srv.server_close()


class StatusHandler(ChatHandler):
    """Answers every POST with ``server.status`` (and ``Location: server.location`` when one is set), no body;
    requests and their Authorization headers are kept in ``server.seen`` / ``server.auth``."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(self.path)
        self.server.auth.append(self.headers.get("Authorization"))
        self.send_response(self.server.status)
        if getattr(self.server, "location", None):
            self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST


class RecordingScoreHandler(ChatHandler):
    """Answers any GET or POST with a valid score of 50, keeping each request's path and Authorization header
    (``server.seen`` / ``server.auth``): the far end of a redirect, which must never be reached."""

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self.server.seen.append(self.path)
        self.server.auth.append(self.headers.get("Authorization"))
        reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                     "content": json.dumps({"score": 50})}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _answer


def score_reply(score: float = 50) -> bytes:
    """A complete chat-completions reply whose content is ``{"score": score}``."""
    return json.dumps({"choices": [{"message": {"role": "assistant",
                                                "content": json.dumps({"score": score})}}]}).encode()


class _Hostile(BaseHTTPRequestHandler):
    """Reads the request (its path kept in ``server.seen``) and leaves the answer to ``answer()``."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(self.path)
        self.answer()

    def answer(self):
        raise NotImplementedError

    def log_message(self, *args):
        pass


class IncompleteReadHandler(_Hostile):
    """Promises 1000 bytes (``Content-Length``), sends the start of a reply and closes the connection."""

    def answer(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(score_reply()[:20])


class BadStatusLineHandler(_Hostile):
    """Answers with a line that is not an HTTP status line."""

    def answer(self):
        self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")


class NestedJSONHandler(_Hostile):
    """A reply nested ``server.depth`` lists deep (default 100 000): the whole body when ``server.where`` is
    ``"body"`` (the default), else a valid envelope whose message content is the nested JSON."""

    def answer(self):
        depth = getattr(self.server, "depth", 100_000)
        nested = "[" * depth + "]" * depth
        if getattr(self.server, "where", "body") == "body":
            reply = nested.encode()
        else:
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": nested}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


class DripHandler(_Hostile):
    """Sends a valid score reply one byte every ``server.interval`` seconds (default 0.5), at most
    ``server.limit`` bytes (default 12) before closing; with ``server.drip_headers`` the status line and headers
    are dripped too, else they arrive at once."""

    def answer(self):
        body = score_reply()
        head = (f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode())
        interval, limit = getattr(self.server, "interval", 0.5), getattr(self.server, "limit", 12)
        data = head + body
        if not getattr(self.server, "drip_headers", False):
            self.wfile.write(head)
            self.wfile.flush()
            data = body
        for i in range(min(limit, len(data))):
            if self.server.closing.wait(interval):
                return
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:                                 # the client has gone
                return


class HugeHandler(_Hostile):
    """A valid score reply padded with spaces to ``server.size`` bytes; ``Content-Length`` is sent unless
    ``server.declare_length`` is False (then the reply ends when the connection closes)."""

    def answer(self):
        body = score_reply()
        body += b" " * max(0, self.server.size - len(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if getattr(self.server, "declare_length", True):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:                                     # the client refused the rest
            pass


class ScriptHandler(_Hostile):
    """Answers the requests in turn from ``server.script``, a list of ``(status, headers)``; the last entry
    repeats. A 200 carries a score of 50, any other status no body."""

    def answer(self):
        status, headers = self.server.script[min(len(self.server.seen), len(self.server.script)) - 1]
        body = score_reply() if status == 200 else b""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
