"""The Prometheus listener: ``/metrics`` and nothing else.

prometheus_client's ``start_http_server`` answers every path (and ``/favicon.ico``) with the
exposition, which makes the port look like a general web server to scanners and lets any path
cost a full collection. Here every other path is a 404 and every other method a 405; the query
string still works (``/metrics?name[]=...`` filters families, as Prometheus documents).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

METRICS_PATH = "/metrics"
ALLOWED_METHODS = ("GET", "HEAD")

StartResponse = Callable[..., Any]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # A slow scraper must not hold up the next one, nor keep the process alive at exit.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """One line per scrape on stderr would drown the server's own log."""


def metrics_only(registry: CollectorRegistry) -> Callable[[dict[str, Any], StartResponse],
                                                          Iterable[bytes]]:
    """A WSGI app that serves the registry's exposition on ``/metrics`` only."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            return _plain(start_response, "404 Not Found", b"not found: try /metrics\n")
        if environ.get("REQUEST_METHOD") not in ALLOWED_METHODS:
            return _plain(start_response, "405 Method Not Allowed", b"GET or HEAD only\n",
                          [("Allow", ", ".join(ALLOWED_METHODS))])
        return exposition(environ, start_response)

    return app


def _plain(start_response: StartResponse, status: str, body: bytes,
           headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


def start_metrics_server(host: str, port: int,
                         registry: CollectorRegistry) -> tuple[WSGIServer, Thread]:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; raises ``OSError`` if the
    address cannot be bound. IPv6 hosts work (the family follows the address)."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_ThreadingServer):
        address_family = family

    server = make_server(address[0], port, metrics_only(registry), Server,
                         handler_class=_QuietHandler)
    thread = Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
