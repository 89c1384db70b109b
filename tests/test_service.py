"""`xmodal serve` (xmodal.retrieval.service) over real HTTP on 127.0.0.1: a real tiny model, a real clipart index.

Every request goes through urllib / http.client to a server bound to an ephemeral port; successful searches are
compared with `Retriever.search` on the same query (same ids, same scores).
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmodal.retrieval import RetrievalError
from xmodal.retrieval.retriever import Retriever, build_index
from xmodal.retrieval.service import ServiceLimits, make_server

ROOT = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------------------------------------------------- fixtures

def tiny_model(towers=("image", "text"), seed=0):
    from xmodal.config import ModelConfig, TowerConfig
    from xmodal.model import XModalModel

    torch.manual_seed(seed)
    all_towers = {"image": TowerConfig(kind="cnn", image_size=32, options={"channels": [8, 16]}),
                  "text": TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 32, "hidden": 32})}
    return XModalModel(ModelConfig(embed_dim=32, towers={t: all_towers[t] for t in towers}))


@pytest.fixture(scope="module")
def built(clipart, tmp_path_factory):
    """(index_dir, run_dir, manifest rows) for an image index of the clipart slice."""
    from xmodal.data import read_manifest

    tmp = tmp_path_factory.mktemp("service")
    run = tiny_model().save(tmp / "run")
    from xmodal.model import load
    manifest = read_manifest(clipart, modalities=["image"], require_all=False)
    build_index(load(run), manifest, "image", tmp / "index", run_dir=run, batch_size=32, progress=False)
    return tmp / "index", run, manifest.dataset


def start(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


LIMITS = dict(max_body_bytes=256 * 1024, max_query_chars=200, max_image_pixels=200 * 200, thumb_size=32)


@pytest.fixture(scope="module")
def server(built):
    index_dir, _, _ = built
    srv = start(make_server(index_dir, "127.0.0.1", 0, **LIMITS))
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def retriever(built):
    return Retriever(built[0])


# --------------------------------------------------------------------------------------------------------- helpers

def request(url, method="GET", body=None, headers=None, timeout=30):
    """(status, headers, body bytes) — HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post_json(server, obj, path="/api/search", **kw):
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    status, headers, data = request(server.url + path, "POST", body, {"Content-Type": "application/json"}, **kw)
    return status, headers, json.loads(data)


def assert_error(answer, status, *fragments):
    got_status, headers, data = answer
    if isinstance(data, bytes):
        data = json.loads(data)
    assert got_status == status, (got_status, data)
    assert headers["Content-Type"].startswith("application/json")
    assert set(data) == {"error"} and isinstance(data["error"], str) and data["error"]
    for f in fragments:
        assert f in data["error"], (f, data["error"])


def same_hits(api_hits, hits):
    assert [h["index_id"] for h in api_hits] == [h.id for h in hits]
    assert [h["rank"] for h in api_hits] == list(range(1, len(hits) + 1))
    for a, h in zip(api_hits, hits):
        assert a["score"] == pytest.approx(h.score, abs=1e-5)
        assert {k: a[k] for k in h.metadata} == h.metadata
        assert a["thumb"] == f"/thumb/{h.id}"


def png_bytes(size=(40, 30), colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- page and info

def test_page_is_one_self_contained_html_file(server):
    status, headers, body = request(server.url + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    html = body.decode()
    for element in ('id="q"', 'id="k"', 'id="search"', 'id="file"', 'id="drop"', 'id="results"'):
        assert element in html
    assert "<script src" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp


def test_info(server, built, retriever):
    status, headers, body = request(server.url + "/api/info")
    info = json.loads(body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert info["modality"] == "image" and info["kind"] == "flat" and info["dim"] == 32
    assert info["size"] == len(retriever.index) == len(built[2])
    assert info["model"]["run_dir"] == str(built[1].absolute()) and len(info["model"]["sha256"]) == 64
    assert info["query_modalities"] == ["image", "text"]
    assert info["limits"]["max_k"] == 100 and info["limits"]["max_body_bytes"] == LIMITS["max_body_bytes"]


# ------------------------------------------------------------------------------------------------------ searches

def test_text_search_equals_retriever(server, retriever):
    status, _, data = post_json(server, {"text": "a red car", "k": 7})
    assert status == 200
    assert data["query"] == {"modality": "text", "value": "a red car"} and data["k"] == 7 and data["took_ms"] >= 0
    same_hits(data["hits"], retriever.search("a red car", "text", k=7))
    # the default k is 10
    status, _, data = post_json(server, {"text": "a drawing of a cat"})
    assert status == 200 and len(data["hits"]) == 10
    same_hits(data["hits"], retriever.search("a drawing of a cat", "text", k=10))


def test_filtered_search_equals_retriever(server, retriever, built):
    label = built[2][0]["label"]
    status, _, data = post_json(server, {"text": "animal", "k": 100, "filter": {"label": label}})
    assert status == 200
    n_label = sum(1 for x in built[2]["label"] if x == label)
    assert len(data["hits"]) == min(100, n_label) and all(h["label"] == label for h in data["hits"])
    same_hits(data["hits"], retriever.search("animal", "text", k=100, filter={"label": label}))
    # a list value means any of them
    labels = sorted(set(built[2]["label"]))[:2]
    status, _, data = post_json(server, {"text": "x", "k": 100, "filter": {"label": labels}})
    assert status == 200 and {h["label"] for h in data["hits"]} <= set(labels)


def test_image_search_json_multipart_and_raw_equal_retriever(server, retriever, built):
    path = built[2][3]["image"]
    raw = Path(path).read_bytes()
    expect = retriever.search(path, "image", k=5)
    assert expect[0].score == pytest.approx(1.0, abs=1e-4)  # the indexed image finds itself (or an exact twin)

    status, _, data = post_json(server, {"image_base64": base64.b64encode(raw).decode(), "k": 5})
    assert status == 200 and data["query"] == {"modality": "image", "value": "(uploaded image)"}
    same_hits(data["hits"], expect)
    # a data: URL, as FileReader.readAsDataURL gives it
    status, _, data = post_json(server, {"image_base64": "data:image/png;base64," + base64.b64encode(raw).decode(),
                                         "k": 5})
    assert status == 200
    same_hits(data["hits"], expect)

    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n5\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    status, _, data = request(server.url + "/api/search", "POST", body,
                              {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200
    same_hits(json.loads(data)["hits"], expect)

    status, _, data = request(server.url + "/api/search?k=5", "POST", raw, {"Content-Type": "image/png"})
    assert status == 200
    same_hits(json.loads(data)["hits"], expect)
    # multipart text query with a JSON filter field
    label = built[2][0]["label"]
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nan animal\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"filter\"\r\n\r\n{{\"label\": \"{label}\"}}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n--{boundary}--\r\n").encode()
    status, _, data = request(server.url + "/api/search", "POST", body,
                              {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200
    same_hits(json.loads(data)["hits"], retriever.search("an animal", "text", k=3, filter={"label": label}))


def test_hits_keep_their_score_when_the_manifest_has_a_score_column(built, tmp_path):
    """A manifest column named score / rank / thumb / index_id never replaces xmodal's own hit fields (it is kept
    in the hit's `metadata`); the score is the cosine of query and item embeddings."""
    import torch.nn.functional as F

    from xmodal.model import load

    _, run, data = built
    clash = {"score": "0.832", "rank": "r", "thumb": "t", "index_id": "x", "metadata": "m"}
    for name, value in clash.items():
        data = data.add_column(name, [value] * len(data))
    model = load(run)
    build_index(model, data, "image", tmp_path / "index", run_dir=run, batch_size=32, progress=False)
    srv = start(make_server(tmp_path / "index", "127.0.0.1", 0, **LIMITS))
    try:
        status, _, answer = post_json(srv, {"text": "a red car", "k": 3})
        assert status == 200
        hits = answer["hits"]
        q = F.normalize(model.encode("text", ["a red car"]), dim=-1)
        items = F.normalize(model.encode("image", [h["value"] for h in hits]), dim=-1)
        truth = (items @ q.T).squeeze(1).tolist()
        assert [h["rank"] for h in hits] == [1, 2, 3]
        for h, cos in zip(hits, truth):
            assert isinstance(h["score"], float) and h["score"] == pytest.approx(cos, abs=1e-5)
            assert isinstance(h["index_id"], int) and h["thumb"] == f"/thumb/{h['index_id']}"
            assert {k: h["metadata"][k] for k in clash} == clash
            status, headers, _ = request(srv.url + h["thumb"])  # thumbnails are addressed by index_id ...
            assert status == 200 and headers["Content-Type"] == "image/jpeg"
        status, _, body = request(srv.url + "/thumb/" + str(hits[0]["id"]))  # ... not by the manifest id
        assert status == 404 and "index_id" in json.loads(body)["error"]
        status, _, body = post_json(srv, {"text": "a red car", "filter": {"lable": "animals"}})
        assert status == 400 and "'lable'" in body["error"] and "label" in body["error"]
    finally:
        stop(srv)

def test_thumbnails_only_for_indexed_images(server, retriever, built):
    status, headers, body = request(server.url + "/thumb/2")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    img = Image.open(io.BytesIO(body))
    assert img.format == "JPEG" and max(img.size) <= LIMITS["thumb_size"]
    assert 2 in server.service._thumbs  # cached (bounded by thumb_cache_bytes)
    assert request(server.url + "/thumb/2")[2] == body
    assert_error(request(server.url + f"/thumb/{len(built[2]) + 1000}"), 404, "no item")
    for bad in ("/thumb/-1", "/thumb/abc", "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/../../etc/passwd",
                "/thumb/" + built[2][0]["image"]):
        status, _, data = request(server.url + bad)
        assert status == 404 and "error" in json.loads(data)


# ---------------------------------------------------------------------------------------------------------- 4xx

def test_bad_queries_are_400(server):
    cases = [
        ({"text": ""}, "empty query"),
        ({"text": "   \n"}, "empty query"),
        ({"text": 42}, "text must be a string"),
        ({"k": 5}, "no query"),
        ({}, "no query"),
        ({"text": "a", "image_base64": "AAAA"}, "one query at a time"),
        ({"text": "a", "colour": "red"}, "unknown field(s) 'colour'; expected"),
        ({"text": "a", "k": 0}, "k must be an integer from 1 to 100"),
        ({"text": "a", "k": 101}, "k must be an integer from 1 to 100"),
        ({"text": "a", "k": -3}, "k must be"),
        ({"text": "a", "k": 2.5}, "k must be"),
        ({"text": "a", "k": "ten"}, "k must be"),
        ({"text": "a", "k": "\u00b2"}, "k must be"),  # a unicode digit
        ({"text": "a", "k": "9" * 5000}, "k must be"),  # longer than Python converts to int
        ({"text": "a", "k": True}, "k must be"),
        ({"text": "a", "k": None}, "k must be"),
        ({"text": "a", "filter": ["label", "x"]}, "bad filter"),
        ({"text": "a", "filter": "label=x"}, "bad filter"),
        ({"text": "a", "filter": {"label": {"$ne": "x"}}}, "bad filter"),
        ({"text": "a", "filter": {"label": []}}, "bad filter"),
        ({"text": "a", "filter": {"label": [["x"]]}}, "bad filter"),
        ({"text": "a", "filter": {"": "x"}}, "bad filter"),
        ({"image_base64": "not base64!!"}, "not valid base64"),
        ({"image_base64": ""}, "empty"),
        ({"image_base64": 12}, "base64 string"),
        ({"image_base64": base64.b64encode(b"definitely not an image").decode()}, "unreadable image"),
        ({"image_base64": base64.b64encode(png_bytes()[:60]).decode()}, "unreadable image"),  # truncated PNG
        ({"image_base64": "data:image/png,abc"}, "base64"),
    ]
    for body, fragment in cases:
        assert_error(post_json(server, body), 400, fragment)
    assert_error(post_json(server, b"{not json"), 400, "not valid JSON")
    assert_error(post_json(server, b"[1, 2]"), 400, "JSON object")
    assert_error(post_json(server, b"\xff\xfe"), 400, "UTF-8")
    assert_error(request(server.url + "/api/search", "POST", b"<<not an image>>", {"Content-Type": "image/png"}), 400,
                 "unreadable image")
    assert_error(request(server.url + "/api/search?k=500", "POST", png_bytes(), {"Content-Type": "image/png"}), 400,
                 "k must be")


def test_unknown_paths_404_and_wrong_methods_405(server):
    assert_error(request(server.url + "/nope"), 404, "no such page")
    assert_error(request(server.url + "/api/nope", "POST", b"{}", {"Content-Type": "application/json"}), 404)
    answer = request(server.url + "/api/search")
    assert_error(answer, 405)
    assert answer[1]["Allow"] == "POST"
    assert_error(request(server.url + "/api/info", "POST", b"{}", {"Content-Type": "application/json"}), 405)
    assert_error(request(server.url + "/api/search", "PUT", b"{}", {"Content-Type": "application/json"}), 405)
    assert_error(request(server.url + "/", "DELETE"), 405)


def test_too_large_is_413(server):
    assert_error(post_json(server, {"text": "x" * 201}), 413, "at most 200")
    big = png_bytes(size=(300, 300))  # 90 000 pixels > max_image_pixels
    assert_error(post_json(server, {"image_base64": base64.b64encode(big).decode()}), 413, "pixels")
    body = json.dumps({"text": "a", "pad": "y" * (LIMITS["max_body_bytes"] + 10)}).encode()
    assert_error(post_json(server, body), 413, "at most 262144")
    # the server did not read the body into a search and keeps serving
    assert post_json(server, {"text": "still here", "k": 1})[0] == 200


def test_missing_length_411_and_unsupported_type_415(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/api/search")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()
    assert_error(request(server.url + "/api/search", "POST", b"a red car", {"Content-Type": "text/plain"}), 415,
                 "unsupported Content-Type")
    assert_error(request(server.url + "/api/search", "POST", b"text=a"), 415)  # urllib's default form type


def test_modality_the_model_lacks_is_422(server, built, tmp_path):
    assert_error(post_json(server, {"audio_base64": base64.b64encode(b"RIFF....").decode()}), 422,
                 "no 'audio' tower")
    # an image-only model cannot embed text queries
    from xmodal.data import read_manifest
    model = tiny_model(towers=("image",), seed=1)
    run = model.save(tmp_path / "run")
    manifest = read_manifest(built[2].select(range(12)), modalities=["image"], require_all=False)
    build_index(model, manifest, "image", tmp_path / "index", run_dir=run, progress=False)
    srv = start(make_server(tmp_path / "index", "127.0.0.1", 0))
    try:
        assert_error(post_json(srv, {"text": "a red car"}), 422, "no 'text' tower")
        info = json.loads(request(srv.url + "/api/info")[2])
        assert info["query_modalities"] == ["image"] and info["size"] == 12
        status, _, data = post_json(srv, {"image_base64": base64.b64encode(png_bytes()).decode(), "k": 3})
        assert status == 200 and len(data["hits"]) == 3
    finally:
        stop(srv)


# ------------------------------------------------------------------------------------------- concurrency, timeouts

def test_busy_and_slow_searches_are_503(built):
    index_dir, run, _ = built
    retriever = Retriever(index_dir)
    srv = start(make_server(retriever, "127.0.0.1", 0, max_concurrency=1, search_timeout=0.3))
    release, started = threading.Event(), threading.Event()
    real_search = retriever.search

    def slow_search(*args, **kw):
        started.set()
        release.wait(20)
        return real_search(*args, **kw)

    retriever.search = slow_search
    try:
        answers = []
        first = threading.Thread(target=lambda: answers.append(post_json(srv, {"text": "slow"})))
        first.start()
        assert started.wait(10)
        # the only search slot is busy: refused at once, not queued
        t0 = time.perf_counter()
        busy = post_json(srv, {"text": "second"})
        assert time.perf_counter() - t0 < 5
        assert_error(busy, 503, "busy")
        assert busy[1]["Retry-After"] == "1"
        first.join(10)
        assert_error(answers[0], 503, "longer than 0.3 s")  # the per-request timeout
        # the timed-out search still holds its slot until it really ends
        assert_error(post_json(srv, {"text": "third"}), 503, "busy")
        release.set()
        deadline = time.time() + 10
        while True:
            status, _, data = post_json(srv, {"text": "fourth", "k": 2})
            if status == 200 or time.time() > deadline:
                break
            time.sleep(0.05)
        assert status == 200 and len(data["hits"]) == 2
    finally:
        release.set()
        retriever.search = real_search
        stop(srv)


def test_connection_limit_and_idle_clients(built):
    srv = start(make_server(built[0], "127.0.0.1", 0, max_connections=1, socket_timeout=1.0))
    try:
        idle = socket.create_connection(srv.server_address[:2])  # holds the only connection slot, sends nothing
        time.sleep(0.2)
        assert_error(request(srv.url + "/api/info"), 503, "connections")
        # the idle client is dropped after socket_timeout, freeing the slot
        deadline = time.time() + 10
        while request(srv.url + "/api/info")[0] != 200:
            assert time.time() < deadline, "the idle connection was never dropped"
            time.sleep(0.1)
        idle.close()
    finally:
        stop(srv)


def test_concurrent_searches_all_answer(server, retriever):
    queries = [f"query number {i}" for i in range(8)]
    results = {}

    def ask(q):
        for _ in range(50):  # 503 when all 4 slots are taken: retry, as a client should
            status, _, data = post_json(server, {"text": q, "k": 3})
            if status != 503:
                results[q] = (status, data)
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=ask, args=(q,)) for q in queries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for q in queries:
        status, data = results[q]
        assert status == 200
        same_hits(data["hits"], retriever.search(q, "text", k=3))


# --------------------------------------------------------------------------------------------------------- CLI

def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_k"):
        ServiceLimits(max_k=0)
    with pytest.raises(ValueError, match="search_timeout"):
        ServiceLimits(search_timeout=-1)


def test_make_server_errors(built, tmp_path, capsys):
    from xmodal.cli import main

    with pytest.raises(FileNotFoundError):
        make_server(tmp_path / "missing", port=0)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(RetrievalError, match="cannot listen"):
            make_server(built[0], "127.0.0.1", port)
        assert main(["serve", "--index", str(built[0]), "--port", str(port)]) == 2
        assert "xmodal serve: error: cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        taken.close()
    assert main(["serve", "--index", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "no index at" in capsys.readouterr().err
    assert main(["serve", "--index", str(built[0]), "--timeout", "0"]) == 2
    assert "--timeout must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serve_answers_and_stops_cleanly_on_ctrl_c(built, sig):
    """Also when started with SIGINT ignored, as a shell's background job (`xmodal serve ... &`) is."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xmodal.cli", "serve", "--index", str(built[0]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        assert line.startswith("xmodal serve: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        status, _, body = request(url + "/api/info")
        assert status == 200 and json.loads(body)["modality"] == "image"
        status, _, body = request(url + "/api/search", "POST", json.dumps({"text": "a cat", "k": 2}).encode(),
                                  {"Content-Type": "application/json"})
        assert status == 200 and len(json.loads(body)["hits"]) == 2
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)  # interpreter teardown is slow on a loaded 2-core machine
        assert proc.returncode == 0, err
        assert "stopping" in out and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_query_asks_a_running_server_and_loads_no_model(server, retriever, built, tmp_path):
    """`xmodal query --server URL`: the running server's hits, printed by a process that imports no torch, faiss or
    numpy (so it answers in the time of one HTTP request); an image file travels as image_base64."""
    def query(*flags):
        code = ("import sys; from xmodal.cli import main; rc = main(sys.argv[1:]); "
                "print([m for m in ('torch', 'faiss', 'numpy') if m in sys.modules], file=sys.stderr); sys.exit(rc)")
        return subprocess.run([sys.executable, "-c", code, "query", "--server", server.url, *flags],
                              capture_output=True, text=True, timeout=120)

    proc = query("--text", "a red car", "-k", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    answer = json.loads(proc.stdout)
    assert answer["query"] == {"modality": "text", "value": "a red car"}
    same_hits(answer["hits"], retriever.search("a red car", "text", k=5))

    image = Path(built[2][3]["image"])
    proc = query("--image", str(image), "-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    same_hits(json.loads(proc.stdout)["hits"], retriever.search(str(image), "image", k=3))

    table = query("--text", "a red car", "-k", "2")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["rank", "score", "id", "label", "value"]
    assert len(table.stdout.splitlines()) == 3

    srv_error = query("--text", " ", "-k", "2")  # the server's 400, as one line
    assert srv_error.returncode == 2 and "answered 400: empty query" in srv_error.stderr
    assert "Traceback" not in srv_error.stderr

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = subprocess.run([sys.executable, "-m", "xmodal.cli", "query", "--server", f"http://127.0.0.1:{port}",
                           "--text", "a red car"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 2 and "cannot reach an xmodal server" in down.stderr and "Traceback" not in down.stderr
    neither = subprocess.run([sys.executable, "-m", "xmodal.cli", "query", "--text", "x"], capture_output=True,
                             text=True, timeout=120)
    assert neither.returncode == 2 and "--index DIR, or --server URL" in neither.stderr
