"""`xmodal serve` under load and against slow clients: the limits of xmodal.retrieval.service hold.

* A bounded run of benchmarks/server_load.py against the real CLI server: valid searches all answer 200, every
  invalid one its 4xx, nothing 5xx, and the server's memory does not grow with the requests.
* ``max_concurrency``: never more searches at once than the bound; the rest are refused at once with 503.
* ``socket_timeout`` / ``request_timeout``: a client that stalls mid-request, or trickles its headers a byte at a
  time, is disconnected, and other clients are answered meanwhile.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from test_service import built, start, stop  # noqa: F401  (the module fixture `built`: tiny model + index)
from xmodal.retrieval.retriever import Retriever
from xmodal.retrieval.service import make_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import server_load  # noqa: E402

RSS_GROWTH_MIB = 20  # after warm-up; measured ~7 MiB over 300 requests, a leak of ~70 KB a request crosses it


@pytest.mark.slow
def test_mixed_load_on_the_cli_server(built):  # noqa: F811
    max_mb = 0.25
    server = server_load.Server(built[0], max_concurrency=8, max_upload_mb=max_mb)
    try:
        max_body = int(max_mb * 1024 * 1024)
        server_load.run_load(server.host, server.port, server_load.make_requests(100, 1, max_body), clients=8)
        before = server_load.rss_kib(server.pid)["VmRSS"]
        stats = server_load.run_load(server.host, server.port, server_load.make_requests(300, 0, max_body),
                                     clients=8)
        after = server_load.rss_kib(server.pid)["VmRSS"]
    finally:
        server.close()
    assert stats["requests"] == 300 and set(stats["by_kind"]) == set(server_load.EXPECTED)  # every kind was sent
    assert stats["server_errors"] == 0, stats
    assert stats["unexpected"] == {}, stats  # valid → 200; oversized/long → 413, bad JSON → 400, no tower → 422
    assert stats["seconds"] < 20, stats
    assert (after - before) / 1024 < RSS_GROWTH_MIB, (before, after)


def _slow_retriever(index_dir, delay: float):
    """A Retriever whose searches take ``delay`` s longer and that records the most queries being searched at once
    (a batched call counts each of its queries)."""
    retriever = Retriever(index_dir)
    real, lock = retriever.search, threading.Lock()
    retriever.running = retriever.peak = 0

    def search(*args, **kwargs):
        n = len(args[0]) if isinstance(args[0], list) else 1
        with lock:
            retriever.running += n
            retriever.peak = max(retriever.peak, retriever.running)
        try:
            time.sleep(delay)
            return real(*args, **kwargs)
        finally:
            with lock:
                retriever.running -= n

    retriever.search = search
    return retriever


@pytest.mark.parametrize("max_batch", [1, 32])  # each search alone; joined (the default)
def test_concurrency_bound_under_load(built, max_batch):  # noqa: F811
    retriever = _slow_retriever(built[0], delay=0.5)
    srv = start(make_server(retriever, "127.0.0.1", 0, max_concurrency=2, max_batch=max_batch))
    answers = []
    try:
        def client():
            for _ in range(4):
                t0 = time.perf_counter()
                status = server_load.post(*srv.server_address[:2], json.dumps({"text": "a cat", "k": 3}).encode())
                answers.append((status, time.perf_counter() - t0))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        stop(srv)
    statuses = [s for s, _ in answers]
    assert len(answers) == 32 and set(statuses) == {200, 503}, statuses
    assert retriever.peak == 2  # the bound, reached and never passed
    busy = [t for s, t in answers if s == 503]
    assert max(busy) < 0.45  # refused at once, not queued behind a 0.5 s search


def _connect(srv) -> socket.socket:
    sock = socket.create_connection(srv.server_address[:2], timeout=10)
    sock.settimeout(0.05)
    return sock


def _closed(sock: socket.socket) -> bool:
    """True once the server has closed the connection (or reset it)."""
    try:
        return sock.recv(1024) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def _others_answered(srv, n: int = 12) -> list[int]:
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(server_load.post(
        *srv.server_address[:2], json.dumps({"text": "a dog", "k": 2}).encode(), timeout=10))) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return statuses


def test_client_stalling_mid_body_is_dropped_after_socket_timeout(built):  # noqa: F811
    srv = start(make_server(built[0], "127.0.0.1", 0, socket_timeout=2.0, max_concurrency=16, max_connections=16))
    try:
        stalled = _connect(srv)
        t0 = time.monotonic()
        stalled.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"text\": ")  # 9 of 100 body bytes, then nothing
        # the stalled connection holds one handler thread; other clients are served meanwhile
        assert _others_answered(srv) == [200] * 12
        assert not _closed(stalled) and time.monotonic() - t0 < 2.0  # (still within its timeout)
        while not _closed(stalled):
            assert time.monotonic() - t0 < 10, "the stalled client was never dropped"
        assert time.monotonic() - t0 > 1.5
        stalled.close()
    finally:
        stop(srv)


def test_client_trickling_headers_is_dropped_after_request_timeout(built):  # noqa: F811
    """A byte every 0.25 s never trips the 1 s idle timeout; the 2 s bound on the whole request does."""
    srv = start(make_server(built[0], "127.0.0.1", 0, socket_timeout=1.0, request_timeout=2.0, max_concurrency=16,
                            max_connections=16))
    try:
        trickle = _connect(srv)
        t0 = time.monotonic()
        header = b"POST /api/search HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 1000
        answered = None
        for i in range(len(header)):
            try:
                trickle.sendall(header[i:i + 1])
            except OSError:
                break
            if _closed(trickle):
                break
            if answered is None and time.monotonic() - t0 > 0.5:
                answered = _others_answered(srv, 4)
            assert time.monotonic() - t0 < 10, "the trickling client was never dropped"
            time.sleep(0.2)
        dropped_after = time.monotonic() - t0
        trickle.close()
        assert 1.8 < dropped_after < 6, dropped_after
        assert answered == [200] * 4
    finally:
        stop(srv)


def test_a_burst_of_new_connections_waits_in_the_listen_backlog(built):  # noqa: F811
    """64 clients connecting at once while the server is not accepting yet (its accept loop busy): the kernel
    completes every handshake into the listen backlog, so none waits for a SYN retry (1 s, then 3 s ...) — with
    socketserver's default backlog of 5, all but ~6 of them would time out here."""
    srv = make_server(built[0], "127.0.0.1", 0)  # bound and listening; serve_forever not started: nothing accepts
    socks, started = [], False
    try:
        for _ in range(64):
            socks.append(socket.create_connection(srv.server_address[:2], timeout=0.5))  # TimeoutError if dropped
        start(srv)
        started = True
        for s in socks[:3]:  # queued connections are then served
            s.sendall(b"GET /api/info HTTP/1.0\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        for s in socks:
            s.close()
        if started:
            stop(srv)
        else:
            srv.server_close()
