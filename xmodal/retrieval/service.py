"""``xmodal serve``: a small JSON API and a web page over a retrieval index (standard library HTTP server).

This module is the HTTP side: routes, headers, bodies, connections and timeouts. What a search request may hold and
how it is answered (parsing, validation, the bounded search pool, thumbnails) is
:mod:`xmodal.retrieval.search_service`.

    from xmodal.retrieval.service import make_server
    server = make_server("indexes/images", port=0)      # port 0: an ephemeral port (tests)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.url)                                    # http://127.0.0.1:PORT
    ...
    server.shutdown(); server.server_close()

Endpoints (every error is JSON ``{"error": "..."}`` with a 4xx/5xx status):

``GET /``
    One self-contained HTML page (inline CSS/JS): a text box, a drop zone / file input for an image, a k selector and a
    grid of results (thumbnail, score, id, label, text).
``GET /api/info``
    ``{"model": {...}, "modality", "size", "kind", "dim", "options", "query_modalities", "limits": {...}}``.
``POST /api/search``
    * ``application/json``: ``{"text": "a red car", "k": 5, "filter": {"label": "animals"}}`` or
      ``{"image_base64": "<base64 or a data: URL>", "k": 5}``;
    * ``multipart/form-data``: fields ``text`` or ``image`` (a file), ``k``, ``filter`` (a JSON object);
    * ``image/*``: the raw image bytes, with ``?k=5&filter=label=animals`` in the query string.

    Answer: ``{"query": {"modality", "value"}, "k", "took_ms", "hits": [{"rank", "index_id", "score", "thumb",
    ...metadata, "metadata": {...}}]}`` — the hits of :meth:`Retriever.search` (same ids, same scores); ``thumb`` is
    ``/thumb/<index_id>`` for items that are images, else ``null``. ``rank``, ``index_id``, ``score``, ``thumb`` and
    ``metadata`` are always xmodal's; the row's metadata fields are copied beside them except those with one of these
    names, and ``metadata`` holds the complete record (a manifest column ``score`` is ``hit["metadata"]["score"]``;
    see :meth:`xmodal.retrieval.index.Hit.to_dict`).
``GET /thumb/<index_id>``
    A JPEG thumbnail of an indexed item's image file, addressed by the hit's ``index_id`` (the index's row number),
    not by the manifest ``id``. Only files named by the index's metadata can be served (the URL
    carries a row id, never a path); thumbnails are cached in memory up to ``thumb_cache_bytes``.

Errors: 400 (bad JSON, missing/empty query, two queries, ``k`` not in ``1..max_k``, bad filter, unreadable image),
404 (unknown path or row, item without an image), 405 (wrong method), 411 (no Content-Length), 413 (body over
``max_body_bytes``, query over ``max_query_chars``, image over ``max_image_pixels``), 415 (unsupported content type or
query modality), 422 (a query modality the model has no tower for), 503 (all ``max_concurrency`` search slots or
``max_connections`` connections busy, or the search ran past ``search_timeout``; with ``Retry-After``).

Robustness: the model is loaded once at start-up; searches run in a pool of ``max_concurrency`` threads (a request
that finds every slot taken is refused at once with 503 rather than queued); open connections are capped at
``max_connections``; a client idle for ``socket_timeout`` seconds is dropped, and one that has not sent its whole
request within ``request_timeout`` seconds (a trickle of bytes resets the idle timer) is too; request bodies are read
only up to ``max_body_bytes``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from . import RetrievalError
from .page import PAGE, PAGE_CSS, PAGE_JS
from .search_service import ApiError, SearchService, ServiceLimits, _short

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- HTTP

def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


PAGE_BYTES = PAGE.encode("utf-8")
# Only the page's own inline script and style run: no external resources, no injected scripts.
PAGE_CSP = (f"default-src 'none'; script-src {_csp_hash(PAGE_JS)}; style-src {_csp_hash(PAGE_CSS)}; "
            f"img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _Handler(BaseHTTPRequestHandler):
    server_version = "xmodal"
    sys_version = ""
    server: "XModalServer"

    @property
    def timeout(self):  # read by StreamRequestHandler.setup(): the socket timeout for this connection
        return self.server.limits.socket_timeout

    def setup(self):
        super().setup()
        # socket_timeout bounds each read, so a client sending a byte every few seconds would hold its connection
        # (one of max_connections) forever: the whole request must also arrive within request_timeout.
        self._deadline = threading.Timer(self.server.limits.request_timeout, self._drop)
        self._deadline.daemon = True
        self._deadline.start()

    def _drop(self) -> None:
        try:  # the blocked read returns what came so far; the client gets a 400 for its cut request, then EOF
            self.connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def finish(self):
        self._deadline.cancel()
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        log.info("%s %s", self.address_string(), format % args)

    # ----------------------------------------------------------------------------------------------- responses
    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store", **(headers or {})})

    def _error(self, e: ApiError) -> None:
        try:
            self._json(e.status, {"error": e.message}, e.headers)
        except OSError:  # the client is gone, or was dropped by request_timeout: nobody to answer
            self.close_connection = True

    def _dispatch(self, fn) -> None:
        if self.command != "POST":  # the request line and headers are in: the whole request, for a bodiless verb
            self._deadline.cancel()
        try:
            fn()
        except ApiError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            self._error(ApiError(500, "internal server error"))

    # ---------------------------------------------------------------------------------------------------- body
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise ApiError(411, "chunked request bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length is required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, f"bad Content-Length {_short(length)}") from None
        limit = self.server.limits.max_body_bytes
        if n > limit:
            self._drain(n)
            raise ApiError(413, f"the request body has {n} bytes; at most {limit} are accepted")
        body = self.rfile.read(n)
        if len(body) < n:
            raise ApiError(400, f"the request body ended after {len(body)} of {n} bytes")
        self._deadline.cancel()  # the request is in; the search and the answer are bounded by other limits
        return body

    def _drain(self, n: int) -> None:
        """Read (and drop) a too-large body, up to a bound, so the client sees the 413 rather than a reset."""
        self.close_connection = True
        left = min(n, self.server.limits.max_body_bytes + (4 << 20))
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    # ---------------------------------------------------------------------------------------------------- verbs
    def do_GET(self):  # noqa: N802
        self._dispatch(self._get)

    def do_HEAD(self):  # noqa: N802
        self._dispatch(self._get)

    def do_POST(self):  # noqa: N802
        self._dispatch(self._post)

    def _not_allowed(self):
        self._dispatch(self._refuse_method)

    def _refuse_method(self) -> None:
        path = urlsplit(self.path).path
        allow = "POST" if path == "/api/search" else "GET, HEAD"
        raise ApiError(405, f"{self.command} is not allowed on {path}", {"Allow": allow})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _get(self) -> None:
        path = urlsplit(self.path).path
        service = self.server.service
        if path in ("/", "/index.html"):
            self._send(200, PAGE_BYTES, "text/html; charset=utf-8",
                       {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache",
                        "Referrer-Policy": "no-referrer"})
        elif path == "/api/info":
            self._json(200, service.info())
        elif path.startswith("/thumb/"):
            ident = path[len("/thumb/"):]
            if not ident.isdigit() or len(ident) > 18:
                raise ApiError(404, f"no thumbnail {_short(ident)}: thumbnails are addressed by an item's index_id")
            data = service.thumbnail(int(ident))
            self._send(200, data, "image/jpeg", {"Cache-Control": "private, max-age=300"})
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        elif path == "/api/search":
            raise ApiError(405, "search with POST /api/search", {"Allow": "POST"})
        else:
            raise ApiError(404, f"no such page: {path}")

    def _post(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/api/search":
            if url.path in ("/", "/index.html", "/api/info") or url.path.startswith("/thumb/"):
                raise ApiError(405, f"POST is not allowed on {url.path}", {"Allow": "GET, HEAD"})
            raise ApiError(404, f"no such endpoint: {url.path}")
        body = self._read_body()
        service = self.server.service
        modality, value, k, filt = service.parse(self.headers.get("Content-Type") or "", body, url.query)
        self._json(200, service.search(modality, value, k, filt))


class XModalServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``limits.max_connections`` connections served at once."""

    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog: socketserver's default is 5, so a burst of more new connections than that while the
    # accept loop is busy had its SYNs dropped — the client retried after 1 s (a p99 of ~1 s) or gave up (lost
    # connections at 32 clients, docs/benchmarks.md). The kernel caps it at net.core.somaxconn.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: SearchService):
        self.service = service
        self.limits = service.limits
        self._conn_slots = threading.BoundedSemaphore(self.limits.max_connections)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def process_request(self, request, client_address):
        if not self._conn_slots.acquire(blocking=False):
            busy = f"the server is busy ({self.limits.max_connections} connections open)"
            body = json.dumps({"error": busy}).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
                                + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._conn_slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._conn_slots.release()

    def server_close(self):
        super().server_close()
        self.service.close()


def make_server(index_dir: Any, host: str = "127.0.0.1", port: int = 8000, *, model: Any = None,
                limits: ServiceLimits | None = None, warmup: bool = True, **limit_overrides: Any) -> XModalServer:
    """Load the index and its model (once) and bind an HTTP server; ``port=0`` picks a free port (``server.url``).

    ``index_dir``: an index folder or a :class:`~xmodal.retrieval.retriever.Retriever`. ``model``: as for
    :class:`Retriever` (default: the run folder recorded in the index). ``limits`` / keyword overrides: see
    :class:`ServiceLimits`. ``warmup``: embed a dummy query per tower before binding, so the first real query is not
    slowed by one-time set-up (tokenizer loading). Call ``serve_forever()`` (in a thread for tests), then
    ``shutdown()`` and ``server_close()``.
    """
    from .retriever import Retriever

    if limits is None:
        limits = ServiceLimits(**limit_overrides)
    elif limit_overrides:
        limits = ServiceLimits(**{**asdict(limits), **limit_overrides})
    retriever = index_dir if isinstance(index_dir, Retriever) else Retriever(index_dir, model=model)
    service = SearchService(retriever, limits, warmup=warmup)
    try:
        return XModalServer((host, int(port)), service)
    except OSError as e:  # the port is taken, the address is not this machine's, ...
        service.close()
        raise RetrievalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(index_dir: Any, host: str = "127.0.0.1", port: int = 8000, *, model: Any = None,
          limits: ServiceLimits | None = None, **limit_overrides: Any) -> None:
    """Serve until Ctrl-C or SIGTERM (then close cleanly)."""
    import signal

    server = make_server(index_dir, host, port, model=model, limits=limits, **limit_overrides)
    info = server.service.info()

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Explicit handlers: a process started in the background inherits SIGINT *ignored* (POSIX shells do that for
    # `cmd &`), and service managers stop with SIGTERM; either way the server must still close cleanly.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"xmodal serve: {server.url}  ({info['size']} {info['modality']} items, {info['kind']} index; "
          f"queries: {', '.join(info['query_modalities'])}) — Ctrl-C to stop", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("xmodal serve: stopping", flush=True)
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["ApiError", "SearchService", "ServiceLimits", "XModalServer", "make_server", "serve"]
