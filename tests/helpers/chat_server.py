"""A chat-completions endpoint on loopback for the judge and explainer tests: the standard library's
http.server, a subclass deciding each reply's content (no mocked client)."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatHandler(BaseHTTPRequestHandler):
    """Subclasses implement ``content(body) -> str | None`` (None: answer HTTP 500); requests are kept in
    ``server.seen``."""

    def content(self, body: dict) -> str | None:
        raise NotImplementedError

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        content = self.content(body)
        if content is None:
            self.send_response(500)
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
    """The running server (``server.server_address``, ``server.seen``), shut down afterwards."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.seen, srv.auth = [], []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
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
