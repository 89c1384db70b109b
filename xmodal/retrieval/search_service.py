"""The search service's request logic, apart from HTTP: what a search request may hold, and how it is answered.

:class:`SearchService` (one per server, shared by its threads) turns a request body into a query and answers it:

* :meth:`~SearchService.parse` — ``(Content-Type, body, query string)`` → ``(modality, value, k, filter)``:
  a JSON object, ``multipart/form-data`` fields or raw ``image/*`` bytes; ``k`` in ``1..max_k``, a filter of scalars,
  base64 decoded, the image opened (and its size bounded) before any model sees it;
* :meth:`~SearchService.search` — the hits as JSON-ready dicts, run in a pool of ``max_concurrency`` threads;
* :meth:`~SearchService.info` and :meth:`~SearchService.thumbnail` — what ``/api/info`` and ``/thumb/<id>`` answer.

Anything wrong is an :class:`ApiError` carrying the status code to answer with; the only thing this layer knows of
HTTP. The server itself (sockets, headers, routes, the page) is :mod:`xmodal.retrieval.service`; the bounds are
:class:`ServiceLimits`, shared by both.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from email import policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qs

from ..modalities.registry import get_modality, modality_names, path_modalities
from . import RetrievalError
from .batcher import SearchBatcher

log = logging.getLogger(__name__)

FILTER_SCALARS = (str, int, float, bool, type(None))


@dataclass
class ServiceLimits:
    """Bounds on what one request may ask for and on the work the server does at once."""

    max_k: int = 100                          # k must be in 1..max_k
    max_body_bytes: int = 10 * 1024 * 1024    # request body (an upload, base64 included)
    max_query_chars: int = 1000               # text query length
    max_image_pixels: int = 40_000_000        # width * height of an uploaded image
    max_concurrency: int = 4                  # searches running at once; more → 503
    max_connections: int = 64                 # open connections (one thread each); more → 503
    search_timeout: float = 30.0              # seconds one search may take before the request gets 503
    socket_timeout: float = 30.0              # a client silent this long is disconnected
    request_timeout: float = 60.0             # a client must send its whole request (headers + body) in this time
    thumb_size: int = 256                     # thumbnails fit in thumb_size x thumb_size
    thumb_cache_bytes: int = 32 * 1024 * 1024  # in-memory thumbnail cache (LRU)
    max_filter_keys: int = 32
    max_filter_values: int = 1000             # items of one list value in a filter
    max_batch: int = 32                       # > 1: concurrent searches joined into one (batcher.py); 1 = each alone
    batch_window: float = 0.002               # seconds a search waits for others to join its batch

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ServiceLimits.{name} must be a positive number, got {value!r}")


class ApiError(Exception):
    """A refused request: answered with HTTP status ``status``, body ``{"error": message}`` and extra ``headers``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# --------------------------------------------------------------------------------------------- request parsing

def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (error messages never echo a whole request back)."""
    return _cut(repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _parse_k(value: Any, max_k: int) -> int:
    if isinstance(value, str):  # from a form field or the query string
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 9:
            value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_k:
        raise ApiError(400, f"k must be an integer from 1 to {max_k}, got {_short(value)}")
    return value


def _parse_filter(value: Any, limits: ServiceLimits) -> dict | None:
    """``None`` / ``{}`` or ``{key: scalar | [scalars]}`` (a list means any of its values)."""
    if value is None:
        return None
    if isinstance(value, str):  # multipart / form fields carry it as JSON text
        try:
            value = json.loads(value) if value.strip() else None
        except ValueError as e:
            raise ApiError(400, f"bad filter: not valid JSON ({e})") from None
        if value is None:
            return None
    if not isinstance(value, dict):
        raise ApiError(400, f"bad filter: expected an object like {{\"label\": \"animals\"}}, got "
                            f"{type(value).__name__}")
    if len(value) > limits.max_filter_keys:
        raise ApiError(400, f"bad filter: at most {limits.max_filter_keys} keys, got {len(value)}")
    out = {}
    for key, v in value.items():
        if not key.strip():
            raise ApiError(400, "bad filter: empty key")
        if isinstance(v, list):
            if not v:
                raise ApiError(400, f"bad filter: the list for {_short(key)} is empty")
            if len(v) > limits.max_filter_values:
                raise ApiError(400, f"bad filter: at most {limits.max_filter_values} values for {_short(key)}")
            if not all(isinstance(x, FILTER_SCALARS) for x in v):
                raise ApiError(400, f"bad filter: the values for {_short(key)} must be strings, numbers, booleans "
                                    f"or null")
        elif not isinstance(v, FILTER_SCALARS):
            raise ApiError(400, f"bad filter: the value for {_short(key)} must be a string, number, boolean, null or a "
                                f"list of them, got {type(v).__name__}")
        out[key] = v
    return out or None


def _decode_base64(data: Any, field: str) -> bytes:
    if not isinstance(data, str):
        raise ApiError(400, f"{field} must be a base64 string, got {type(data).__name__}")
    if data.startswith("data:"):  # a data: URL straight from FileReader.readAsDataURL
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{field}: a data: URL must be base64-encoded")
    data = "".join(data.split())
    if not data:
        raise ApiError(400, f"{field} is empty")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{field} is not valid base64: {e}") from None


def _open_image(raw: bytes, limits: ServiceLimits):
    """Decode uploaded bytes into a loaded PIL image, or 400 / 413."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise ApiError(400, "the image is empty")
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise ApiError(413, f"the image has {w}x{h} pixels; at most {limits.max_image_pixels} are accepted")
        img.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"unreadable image: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt files
        raise ApiError(400, f"unreadable image: {e}") from None
    return img


def _multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """Parse ``multipart/form-data`` into ``{name: str | bytes}`` (file parts as bytes)."""
    msg = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    if not msg.is_multipart():
        raise ApiError(400, "malformed multipart/form-data body")
    fields: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None or name == "image":
            fields[name] = payload
        else:
            fields[name] = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
    return fields


# ---------------------------------------------------------------------------------------------------- service

class SearchService:
    """The request logic, independent of HTTP: validation, bounded concurrent searches, thumbnails."""

    def __init__(self, retriever, limits: ServiceLimits | None = None, warmup: bool = True):
        self.retriever = retriever
        self.limits = limits or ServiceLimits()
        self.model = retriever.model  # load (and fingerprint-check) the model now, not on the first request
        from .retriever import _model_modalities
        self.query_modalities = _model_modalities(self.model)
        if warmup:
            self._warmup()
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self.limits.max_concurrency, thread_name_prefix="xmodal-search")
        self._batcher = SearchBatcher(retriever, self.limits.batch_window, self.limits.max_batch) \
            if self.limits.max_batch > 1 else None
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumb_bytes = 0
        self._thumb_lock = threading.Lock()

    def _warmup(self) -> None:
        """Embed one dummy text / image now: the first query otherwise pays for tokenizer and kernel set-up."""
        from PIL import Image

        dummies = {"text": "warm up", "image": Image.new("RGB", (16, 16), "white")}
        for modality, value in dummies.items():
            if modality in self.query_modalities:
                t0 = time.perf_counter()
                try:
                    self.model.encode(modality, [value], progress=False)
                except Exception as e:  # a real query will report the problem
                    log.warning("warm-up of the %s tower failed: %s", modality, e)
                log.debug("warm-up %s: %.0f ms", modality, (time.perf_counter() - t0) * 1000)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._batcher is not None:
            self._batcher.close()

    # ------------------------------------------------------------------------------------------------------ info
    def info(self) -> dict:
        index = self.retriever.index
        mi = dict(index.model_info or {})
        return {"model": {"run_dir": mi.get("run_dir"), "sha256": mi.get("sha256"), "embed_dim": mi.get("embed_dim"),
                          "towers": self.query_modalities},
                "modality": self.retriever.modality, "size": len(index), "kind": index.kind, "dim": index.dim,
                "options": index.options, "query_modalities": self.query_modalities,
                "limits": {"max_k": self.limits.max_k, "max_body_bytes": self.limits.max_body_bytes,
                           "max_query_chars": self.limits.max_query_chars,
                           "max_image_pixels": self.limits.max_image_pixels}}

    # ---------------------------------------------------------------------------------------------------- parsing
    def _check_modality(self, modality: str) -> None:
        if modality not in self.query_modalities:
            name = _short(modality)
            raise ApiError(422, f"this model has no {name} tower, so it cannot embed {name[1:-1]} queries "
                                f"(query modalities: {', '.join(self.query_modalities)})")

    def parse(self, content_type: str, body: bytes, query_string: str = "") -> tuple[str, Any, int, dict | None]:
        """``(modality, value, k, filter)`` from a request body; :class:`ApiError` for anything wrong with it."""
        ctype = content_type.split(";", 1)[0].strip().lower()
        params = parse_qs(query_string, keep_blank_values=True)
        if ctype == "application/json":
            try:
                data = json.loads(body.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ApiError(400, f"request body is not UTF-8: {e}") from None
            except ValueError as e:
                raise ApiError(400, f"request body is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
        elif ctype == "multipart/form-data":
            data = _multipart(content_type, body)
        elif ctype.startswith("image/"):
            data = {"image": body, "k": params.get("k", [10])[-1]}
            if "filter" in params:
                from .filters import parse_filters
                try:
                    data["filter"] = parse_filters(params["filter"])
                except RetrievalError as e:
                    raise ApiError(400, f"bad filter: {e}") from None
        else:
            raise ApiError(415, f"unsupported Content-Type {_short(ctype or '(none)')}: send application/json, "
                                f"multipart/form-data or image/*")

        # The fields that hold a query, one per registered modality: "<m>" for a string-valued modality (text),
        # "<m>_base64" (or the raw body / a multipart file) for one whose values are files.
        strings = {m for m in modality_names() if get_modality(m).value == "string"}
        query_keys = [key for key in data if key in strings or key.endswith("_base64") or key in path_modalities()]
        unknown = sorted(set(data) - set(query_keys) - {"k", "filter"})
        if unknown:
            names = _cut(", ".join(map(repr, unknown)), 200)
            raise ApiError(400, f"unknown field(s) {names}; expected text or image_base64, "
                                f"k, filter")
        if not query_keys:
            raise ApiError(400, "no query: give \"text\" or \"image_base64\"")
        if len(query_keys) > 1:
            raise ApiError(400, f"one query at a time, got {_short(', '.join(query_keys), 200)}")
        key = query_keys[0]
        k = _parse_k(data.get("k", 10), self.limits.max_k)
        filt = _parse_filter(data.get("filter"), self.limits)

        if key in strings:
            text = data[key]
            if not isinstance(text, str):
                raise ApiError(400, f"{key} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise ApiError(400, "empty query: type some text")
            if len(text) > self.limits.max_query_chars:
                raise ApiError(413, f"the query has {len(text)} characters; at most {self.limits.max_query_chars} "
                                    f"are accepted")
            self._check_modality(key)
            return key, text, k, filt
        modality = key[: -len("_base64")] if key.endswith("_base64") else key
        self._check_modality(modality)
        raw = data[key] if isinstance(data[key], bytes) else _decode_base64(data[key], key)
        if modality == "image":  # decoded under the service's pixel limits (decompression bombs)
            return "image", _open_image(raw, self.limits), k, filt
        if get_modality(modality).read_bytes is None:
            raise ApiError(415, f"{_short(modality)} queries are not supported by the web service ({modality} "
                                f"declares no way to read uploaded bytes)")
        try:
            return modality, get_modality(modality).decode_bytes(raw), k, filt
        except Exception as e:  # noqa: BLE001 - the modality's own reader: any failure is a bad upload
            raise ApiError(400, f"cannot read the uploaded {modality}: {type(e).__name__}: {_short(str(e), 200)}") \
                from None

    # ----------------------------------------------------------------------------------------------------- search
    def search(self, modality: str, value: Any, k: int, filt: dict | None) -> dict:
        """Run one search in the bounded pool; 503 when every slot is busy or it takes too long."""
        if not self._slots.acquire(blocking=False):
            raise ApiError(503, f"the server is busy ({self.limits.max_concurrency} searches running); try again",
                           {"Retry-After": "1"})
        try:
            future = self._batcher.submit(value, modality, k, filt) if self._batcher is not None else \
                self._pool.submit(self.retriever.search, value, modality, k=k, filter=filt)
        except RuntimeError:  # closed: the server is shutting down
            self._slots.release()
            raise ApiError(503, "the server is shutting down", {"Retry-After": "1"}) from None
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())  # the slot is held until the work really ends
        t0 = time.perf_counter()
        try:
            hits = future.result(timeout=self.limits.search_timeout)
        except FutureTimeout:
            raise ApiError(503, f"the search took longer than {self.limits.search_timeout:g} s", {"Retry-After": "1"})
        except RetrievalError as e:
            raise ApiError(400, str(e)) from None
        took = (time.perf_counter() - t0) * 1000
        shown = value if modality == "text" else "(uploaded image)"
        return {"query": {"modality": modality, "value": shown}, "k": k, "took_ms": round(took, 3),
                "hits": [{"rank": r, **h.to_dict(), "thumb": self.thumb_url(h.id, h.metadata)}
                         for r, h in enumerate(hits, 1)]}

    # ------------------------------------------------------------------------------------------------- thumbnails
    @staticmethod
    def _image_path(meta: dict) -> str | None:
        value = meta.get("value")
        if meta.get("modality") == "image" and isinstance(value, str) and value:
            return value
        return None

    def thumb_url(self, index_id: int, meta: dict) -> str | None:
        return f"/thumb/{int(index_id)}" if self._image_path(meta) else None

    def thumbnail(self, index_id: int) -> bytes:
        """JPEG thumbnail of the image file an index row names; 404 for anything else."""
        with self._thumb_lock:
            if index_id in self._thumbs:
                self._thumbs.move_to_end(index_id)
                return self._thumbs[index_id]
        index = self.retriever.index
        if index_id not in index:
            raise ApiError(404, f"no item with index_id {index_id}")
        path = self._image_path(index.metadata(index_id))
        if path is None:
            raise ApiError(404, f"item {index_id} has no image")
        from PIL import Image

        from ..modalities.image import load_image
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > self.limits.max_image_pixels:
                    raise ApiError(404, f"the image of item {index_id} is too large to thumbnail")
                im.draft("RGB", (self.limits.thumb_size, self.limits.thumb_size))  # JPEG: decode at reduced size
                img = load_image(im)
        except ApiError:
            raise
        except Exception as e:  # missing or unreadable file
            log.warning("thumbnail of item %d (%s): %s", index_id, path, e)
            raise ApiError(404, f"the image file of item {index_id} cannot be read") from None
        img.thumbnail((self.limits.thumb_size, self.limits.thumb_size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._thumb_lock:
            if index_id not in self._thumbs and len(data) <= self.limits.thumb_cache_bytes:
                self._thumbs[index_id] = data
                self._thumb_bytes += len(data)
                while self._thumb_bytes > self.limits.thumb_cache_bytes:
                    _, old = self._thumbs.popitem(last=False)
                    self._thumb_bytes -= len(old)
        return data
