"""A real S3-protocol server on loopback (moto's), with a log of the requests it served.

Same as ``moto.server.ThreadedMotoServer`` but bound to 127.0.0.1, restartable on the same port
(moto's backends are process-global, so objects survive a restart), and with a WSGI middleware
that records each request's method, path and Range header so tests can count what was fetched.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    range: str | None
    query: str


class RecordingS3Server:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None
        self._app = DomainDispatcherApplication(create_backend_app)

    def _recording_app(self, environ, start_response):
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    method=environ.get("REQUEST_METHOD", ""),
                    path=environ.get("PATH_INFO", ""),
                    range=environ.get("HTTP_RANGE"),
                    query=environ.get("QUERY_STRING", ""),
                )
            )
        return self._app(environ, start_response)

    def start(self) -> None:
        self._server = make_server("127.0.0.1", self.port, self._recording_app, threaded=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def gets(self, key_suffix: str = "") -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith(key_suffix)]
