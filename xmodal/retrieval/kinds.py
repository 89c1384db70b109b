"""Index kinds: which faiss object each one is, its options and their defaults, training, search parameters.

========  =================================================================  ==========================  ===========
kind      faiss object                                                       bytes / vector (d = 256)    exact
========  =================================================================  ==========================  ===========
flat      ``IndexIDMap2(IndexFlatIP)``                                       4·d + 8 (1032)              yes
hnsw      ``IndexIDMap2(IndexHNSWFlat(d, M, IP))``                           4·d + 8·M·~1.03 + 8         no
ivf       ``IndexIVFFlat(IndexFlatIP, d, nlist, IP)``                        4·d + ~16                   no
int8      ``IndexIDMap2(IndexScalarQuantizer(d, QT_8bit, IP))``              d + 8 (264)                 no
binary    ``IndexIDMap2(IndexLSH(d, d))``: the sign bit of each dimension    d/8 + 8 (40)                no
ivfpq     ``IndexIVFPQ(IndexFlatIP, d, nlist, m, nbits, IP)``                m·nbits/8 + ~16 (48)        no
  +rescore the same, without the id → code hash map; floats in ``vectors.npy``  m·nbits/8 + 8 in RAM         no
========  =================================================================  ==========================  ===========

``int8`` stores each dimension as one byte between a per-dimension min and max learnt from the first vectors added;
its scores are inner products with the decoded vectors. ``binary`` keeps one bit per dimension (``x_i > 0``) and
searches in two steps: the ``rescore · k`` nearest codes by Hamming distance, then those candidates re-ranked by
the float query's inner product with their sign vectors scaled to unit length (``q · sign(x) / sqrt(d)``: the score a
binary hit reports) — the asymmetric rescoring of sentence-transformers' quantisation. ``ivfpq`` is faiss's
inverted file with product quantisation: ``m`` sub-vectors of ``d/m`` dimensions, each coded on ``nbits`` bits
(``m`` defaults to ``d/8``, i.e. 32 bytes at 256-d; ``nbits`` to 8, fewer when there are under 39·2^nbits vectors
to train on). ``int8``, ``ivf`` and ``ivfpq`` are trained on the vectors of the first add. ``ivfpq`` with
``rescore=R`` re-ranks the ``R·k`` best PQ candidates by their exact inner product with the float vectors, which it
keeps on disk (:mod:`~xmodal.retrieval.float_rows`, memory-mapped) instead of in RAM.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import faiss
import numpy as np

from . import RetrievalError

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf", "int8", "binary", "ivfpq")
TRAINED = ("ivf", "int8", "ivfpq")   # a quantizer learnt from the first vectors added
LOSSY = ("int8", "ivfpq")            # the stored vectors are not the vectors added (no lossless rebuild)
# each kind's options and their defaults (None: chosen when the index is trained)
DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {}, "int8": {},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
    "ivf": {"nlist": None, "nprobe": None},
    "binary": {"rescore": 10},
    "ivfpq": {"nlist": None, "nprobe": None, "m": None, "nbits": None},
}
# options a kind takes that are absent (off) unless given: ivfpq's float re-ranking
OPTIONAL: dict[str, tuple[str, ...]] = {"ivfpq": ("rescore",)}
# the search-time knob of each approximate kind: what `--tune` sets (flat and int8 have none)
KNOB = {"hnsw": "ef_search", "ivf": "nprobe", "ivfpq": "nprobe", "binary": "rescore"}


def check_options(kind: str, dim: int, given: dict[str, Any]) -> dict[str, Any]:
    """The options of a ``kind`` index: its defaults updated with ``given`` (``None`` = default). A value below 1
    is a :class:`RetrievalError` naming it; an option the kind does not take is ignored with a warning."""
    if kind not in KINDS:
        raise RetrievalError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    options = dict(DEFAULTS[kind])
    for name, value in given.items():
        if value is None:
            continue
        if name not in options and name not in OPTIONAL.get(kind, ()):  # as before 0.3: an option of another kind is ignored (`--nlist` with a flat index)
            log.warning("option %s=%r does not apply to a %r index (its options: %s); ignored", name, value, kind,
                        ", ".join([*options, *OPTIONAL.get(kind, ())]) or "none")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise RetrievalError(f"{name} must be a positive integer, got {value!r}")
        if value < 1:
            raise RetrievalError(f"{name} must be at least 1, got {value}")
        options[name] = int(value)
    if kind == "ivfpq" and options["m"] is not None and dim % options["m"]:
        raise RetrievalError(f"ivfpq: m={options['m']} sub-vectors must divide the dimension {dim}")
    if kind == "ivfpq" and options["nbits"] is not None and options["nbits"] > 16:
        raise RetrievalError(f"ivfpq: nbits must be at most 16, got {options['nbits']}")
    return options


def auto_nlist(n: int) -> int:
    """~4·sqrt(n) inverted lists, but at least 39 training points per list (faiss's k-means guideline)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _nprobe(options: dict, nlist: int) -> int:
    nprobe = options.get("nprobe")
    return int(min(nlist, nprobe if nprobe else max(1, nlist // 8)))


def _pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` that is at most ``dim / 8`` (32 sub-vectors of 8 dimensions at 256-d)."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def new_faiss(kind: str, dim: int, options: dict, nlist: int = 1):
    """An empty faiss index of ``kind`` (untrained for the kinds in :data:`TRAINED`)."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        h = faiss.IndexHNSWFlat(dim, options["M"], ip)
        h.hnsw.efConstruction = options["ef_construction"]
        h.hnsw.efSearch = options["ef_search"]
        return faiss.IndexIDMap2(h)
    if kind == "int8":
        return faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip))
    if kind == "binary":
        return faiss.IndexIDMap2(faiss.IndexLSH(dim, dim, False, False))
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        ivf = faiss.IndexIVFFlat(quantizer, dim, int(nlist), ip)
    else:
        ivf = faiss.IndexIVFPQ(quantizer, dim, int(nlist), options["m"] or _pq_m(dim), options["nbits"] or 8, ip)
    if kind == "ivfpq" and options.get("rescore"):  # vectors come from vectors.npy: no id -> code map in RAM
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    else:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct(id) for arbitrary ids, with removal
    ivf.nprobe = _nprobe(options, int(nlist))
    return ivf


def train(kind: str, dim: int, options: dict, x: np.ndarray):
    """A trained, empty faiss index of ``kind`` for vectors like ``x``; fills the options chosen from ``x``
    (``nlist``, ``nprobe``, ``m``, ``nbits``) into ``options``."""
    if kind == "int8":
        index = new_faiss(kind, dim, options)
        index.train(x)
        return index
    nlist = options.get("nlist") or auto_nlist(len(x))
    if nlist > len(x):
        log.warning("%s index: %d inverted lists requested but only %d vectors to train on; using %d",
                    kind, nlist, len(x), len(x))
        nlist = len(x)
    if kind == "ivfpq":
        options["m"] = options.get("m") or _pq_m(dim)
        # faiss's k-means wants >= 39 points per centroid: fewer bits per sub-vector code on small collections
        options["nbits"] = options.get("nbits") or max(1, min(8, int(math.log2(max(2, len(x) // 39)))))
    index = new_faiss(kind, dim, options, nlist)
    index.train(x)
    options["nlist"] = int(nlist)
    options["nprobe"] = _nprobe(options, nlist)
    index.nprobe = options["nprobe"]
    return index


def configure_loaded(kind: str, index, options: dict) -> None:
    """Apply the stored search options to a faiss index read from disk."""
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = options["ef_search"]
    elif kind in ("ivf", "ivfpq") and options.get("nprobe"):
        index.nprobe = int(options["nprobe"])


def search_params(kind: str, index, options: dict, sel, k: int, ef_search: int | None, nprobe: int | None):
    """faiss search parameters for one call (``sel``: an ``IDSelector`` or ``None``)."""
    kw: dict[str, Any] = {}
    if sel is not None:
        kw["sel"] = sel
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(int(ef_search or options["ef_search"]), k), **kw)
    if kind in ("ivf", "ivfpq"):
        return faiss.SearchParametersIVF(nprobe=int(nprobe or index.nprobe), **kw)
    return faiss.SearchParameters(**kw) if kw else None


_RESCORE_BUDGET = 1 << 24  # floats of sign vectors unpacked at once (64 MiB): queries are re-ranked in chunks


def binary_search(index, q: np.ndarray, k: int, rescore: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of a binary index: ``rescore · k`` candidates by Hamming distance, re-ranked by ``q · sign / √d``
    (ties by id, ascending). Missing candidates are id ``-1`` with score ``-inf``, as faiss pads.

    The candidates' codes are read from the ``IndexLSH``'s code array by position (no id look-up per row) and
    unpacked to ±1, a chunk of queries at a time so the unpacked signs stay within ``_RESCORE_BUDGET`` floats."""
    lsh = faiss.downcast_index(index.index)
    n, d, size = int(lsh.ntotal), q.shape[1], int(lsh.code_size)
    codes = faiss.rev_swig_ptr(lsh.codes.data(), n * size).reshape(n, size)
    id_map = faiss.rev_swig_ptr(index.id_map.data(), n)
    c = int(min(n, max(k, rescore * k)))
    step = max(1, _RESCORE_BUDGET // (c * d))
    scores, labels = [], []
    for s in range(0, len(q), step):
        qq = q[s:s + step]
        _, pos = lsh.search(qq, c)
        valid = pos >= 0
        bits = np.unpackbits(codes[np.where(valid, pos, 0)], axis=-1, bitorder="little")[..., :d]
        sc = (2.0 * np.einsum("qd,qcd->qc", qq, bits, dtype=np.float32) - qq.sum(1, keepdims=True))
        sc = (sc / np.float32(math.sqrt(d))).astype(np.float32)
        cand = np.where(valid, id_map[np.where(valid, pos, 0)], -1)
        sc[~valid] = -np.inf
        order = np.lexsort((np.where(valid, cand, np.iinfo(np.int64).max), -sc), axis=1)[:, :k]
        scores.append(np.take_along_axis(sc, order, 1))
        labels.append(np.take_along_axis(cand, order, 1))
    return np.concatenate(scores), np.concatenate(labels)


def code_bytes(kind: str, dim: int, options: dict) -> float:
    """Bytes per vector of the codes (without ids or lists), for the tables of ``--tune`` and the benchmarks."""
    if kind in ("flat", "hnsw", "ivf"):
        return 4.0 * dim
    if kind == "int8":
        return float(dim)
    if kind == "binary":
        return dim / 8
    return (options.get("m") or _pq_m(dim)) * (options.get("nbits") or 8) / 8
