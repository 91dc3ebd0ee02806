"""The HTTP server of a worker (and of ``ensync-kafka dashboard``): small, stdlib, read-only.

======================================  =========================================================
``/healthz``, ``/readyz``               liveness; readiness (every assigned partition restored)
``/metrics``                            Prometheus text exposition
``/api/v1/local/status``                this worker: held, next due, lag per tier and partition
``/api/v1/local/upcoming``              this worker's held deferrals in due order (paged)
``/api/v1/local/deferrals/<id>``        this worker's knowledge of one deferral (404: none)
``/api/v1/status``, ``/upcoming``,      the same across every announced worker (query.py)
``/deferrals/<id>``, ``/workers``
``/api/v1/audit``, ``/api/v1/dead``     the latest audit records and dead letters
``/``                                   the dashboard (``ensync_kafka/dashboard/``)
======================================  =========================================================

Query parameters: ``tier``, ``queue``, ``limit``, ``after`` (the ``next`` cursor of a page).
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any

from .config import Config
from .exceptions import EnsyncKafkaError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .query import Cluster, Tail

if TYPE_CHECKING:
    from .monitor import Monitor

log = logging.getLogger("ensync_kafka.web")

JSON_TYPE = "application/json"
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

Response = tuple[int, str, bytes]


def _json(status: int, body: Any) -> Response:
    return status, JSON_TYPE, json.dumps(body, separators=(",", ":")).encode()


def _text(status: int, body: str) -> Response:
    return status, "text/plain; charset=utf-8", body.encode()


def _limit(query: dict[str, str]) -> int:
    try:
        return max(1, min(int(query.get("limit", DEFAULT_LIMIT)), MAX_LIMIT))
    except ValueError:
        raise _BadRequest("limit: an integer is required") from None


class _BadRequest(Exception):
    pass


class App:
    """Routes a GET to a response. ``local`` is the worker's monitor (None for the dashboard
    command); cross-worker queries connect to Kafka on first use."""

    def __init__(self, config: Config, *, local: Monitor | None = None) -> None:
        self.config = config
        self.local = local
        self._lock = threading.Lock()
        self._cluster: Cluster | None = None
        self._tail: Tail | None = None

    def cluster(self) -> Cluster:
        with self._lock:
            if self._cluster is None:
                self._cluster = Cluster(self.config)
            return self._cluster

    def tail(self) -> Tail:
        with self._lock:
            if self._tail is None:
                self._tail = Tail(self.config)
            return self._tail

    def close(self) -> None:
        with self._lock:
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None

    def handle(self, path: str, query: dict[str, str]) -> Response:
        try:
            return self._route(path, query)
        except _BadRequest as exc:
            return _json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except EnsyncKafkaError as exc:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})

    def _route(self, path: str, query: dict[str, str]) -> Response:
        local = self.local
        if path in ("/", "/index.html"):
            return _static("index.html")
        if path.startswith("/dashboard/"):
            return _static(path.removeprefix("/dashboard/"))
        if path == "/healthz":
            ok, detail = local.healthy() if local else (True, {})
            return _json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, detail)
        if path == "/readyz":
            ok, detail = local.ready() if local else (True, {"ready": True})
            return _json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, detail)
        if path == "/metrics":
            if local is None:
                return _text(HTTPStatus.NOT_FOUND, "no metrics: not a worker\n")
            return HTTPStatus.OK, METRICS_CONTENT_TYPE, local.metrics.exposition()
        tier, queue = query.get("tier") or None, query.get("queue") or None
        if tier is not None and tier not in self.config.tier_names:
            raise _BadRequest(f"tier: unknown tier {tier!r}")
        if path.startswith("/api/v1/local/"):
            if local is None:
                return _json(HTTPStatus.NOT_FOUND, {"error": "not a worker"})
            return self._local(local, path.removeprefix("/api/v1/local/"), query, tier, queue)
        if path == "/api/v1/status":
            return _json(HTTPStatus.OK, self.cluster().status())
        if path == "/api/v1/workers":
            return _json(HTTPStatus.OK, [w.as_dict() for w in self.cluster().workers()])
        if path == "/api/v1/upcoming":
            page = self.cluster().upcoming(
                tier=tier, queue=queue, limit=_limit(query), after=query.get("after") or None
            )
            return _json(HTTPStatus.OK, page)
        if path.startswith("/api/v1/deferrals/"):
            defer_id = path.removeprefix("/api/v1/deferrals/")
            return _json(HTTPStatus.OK, self.cluster().show(defer_id))
        if path == "/api/v1/audit":
            return _json(HTTPStatus.OK, self.tail().audit(_limit(query)))
        if path == "/api/v1/dead":
            return _json(HTTPStatus.OK, self.tail().dead(_limit(query)))
        return _json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {path}"})

    def _local(
        self,
        local: Monitor,
        what: str,
        query: dict[str, str],
        tier: str | None,
        queue: str | None,
    ) -> Response:
        if what == "status":
            return _json(HTTPStatus.OK, local.status())
        if what == "upcoming":
            try:
                after = bytes.fromhex(query.get("after", ""))
            except ValueError:
                raise _BadRequest("after: the 'next' cursor of a previous page") from None
            page = local.upcoming(tier=tier, queue=queue, limit=_limit(query), after=after)
            return _json(HTTPStatus.OK, page)
        if what.startswith("deferrals/"):
            found = local.lookup(what.removeprefix("deferrals/"))
            if found is None:
                return _json(HTTPStatus.NOT_FOUND, {"error": "not held here"})
            return _json(HTTPStatus.OK, found)
        return _json(HTTPStatus.NOT_FOUND, {"error": f"no such path: /api/v1/local/{what}"})


def _static(name: str) -> Response:
    content_type = _STATIC.get(name)
    if content_type is None:
        return _text(HTTPStatus.NOT_FOUND, "not found\n")
    data = resources.files("ensync_kafka").joinpath("dashboard", name).read_bytes()
    return HTTPStatus.OK, content_type, data


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parts.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
        try:
            status, content_type, body = self.server.app.handle(path, query)
        except Exception:
            log.exception("GET %s", self.path)
            status, content_type, body = _text(HTTPStatus.INTERNAL_SERVER_ERROR, "error\n")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, _Handler)


class WebServer:
    """Binds at construction (a taken port fails at once); serves in a daemon thread."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self.app = app
        self._server = _Server((host, port), app)
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
            name=f"http-{self.port}",
        )  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
        self.app.close()
