"""A stdlib HTTP server on 127.0.0.1 in a background thread: the lifecycle every fake service shares,
and the JSON request/answer plumbing of the fake REST APIs (KFP, Kubernetes)."""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


class LoopbackServer:
    """Subclasses build their ThreadingHTTPServer in `_bind(port)`; the server's `fake` is the subclass."""

    def __init__(self) -> None:
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _bind(self, port: int) -> ThreadingHTTPServer:
        raise NotImplementedError

    @property
    def root_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self, port: int = 0) -> Self:
        httpd = self._bind(port)
        httpd.fake = self  # type: ignore[attr-defined]  # handlers reach their fake through the server
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RecordedRequest:
    """One request as a fake saw it (tests assert on these)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def form_parts(self) -> dict[str, tuple[str | None, bytes]]:
        """A multipart/form-data body as {field name: (file name, content)}."""
        content_type = self.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return {}
        head = f"Content-Type: {content_type}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        return {
            str(part.get_param("name", header="content-disposition")): (
                part.get_filename(),
                part.get_payload(decode=True) or b"",
            )
            for part in message.iter_parts()
        }


# What a JSON fake's handle(request) returns: (status, JSON payload, extra headers).
JsonAnswer = tuple[int, Any, dict[str, str]]


class JsonRequestHandler(BaseHTTPRequestHandler):
    """Hands every request to the server's fake (`fake.handle(RecordedRequest) -> JsonAnswer`)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as urllib3's pool expects of real servers
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms ACK stalls

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read their own logs
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        request = RecordedRequest(
            method=self.command,
            path=url.path,
            query=parse_qs(url.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        status, payload, headers = self.server.fake.handle(request)  # type: ignore[attr-defined]
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def json_server(port: int) -> ThreadingHTTPServer:
    """A threaded server on 127.0.0.1:`port` (0: any free port) answering through JsonRequestHandler."""
    server = ThreadingHTTPServer(("127.0.0.1", port), JsonRequestHandler)
    server.daemon_threads = True
    return server
