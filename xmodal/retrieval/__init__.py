"""Retrieval over the shared space: a faiss index of embeddings + metadata, and any→any queries.

    from xmodal.retrieval import build_index, Retriever
    build_index(model, manifest, "image", "indexes/images", run_dir="runs/pretrain")
    hits = Retriever("indexes/images").search("a red car", "text", k=5)

Modules: ``index.py`` the index (faiss + metadata, search), ``kinds.py`` its kinds (flat, HNSW, IVF, int8, binary,
IVF-PQ), ``exact.py`` exact batch search by matrix product, ``tuning.py`` search settings for a target recall,
``sharded.py`` shards searched as one index, ``index_files.py`` its folder on disk (crash-safe save, checked load), ``filters.py`` metadata filters, ``retriever.py`` building and querying it with a model,
``search_service.py`` the web service's request logic and ``service.py`` its HTTP server (``page.py`` the page it
shows). The error classes live here (not in ``index.py``) so the CLI can catch them without importing faiss or
torch.
"""


class RetrievalError(ValueError):
    """A user-facing retrieval problem (bad ``k``, a modality the model lacks, an unusable index folder, ...)."""


class IndexCorruptError(RetrievalError):
    """An index folder is incomplete or inconsistent (missing files, wrong sizes, row counts that disagree)."""


class FingerprintMismatchError(RetrievalError):
    """The query model is not the model that built the index (different weights, embedding size or run folder)."""


__all__ = ["EmbeddingIndex", "Hit", "ShardedIndex", "open_index", "Retriever", "build_index", "model_fingerprint", "parse_filters", "format_hits",
           "RetrievalError", "IndexCorruptError", "FingerprintMismatchError"]


def __getattr__(name):  # lazy: faiss / numpy load on first use
    if name in ("Hit", "format_hits"):  # light: what `xmodal query --server` prints
        from . import hits
        return getattr(hits, name)
    if name == "EmbeddingIndex":
        from . import index
        return getattr(index, name)
    if name in ("ShardedIndex", "open_index"):
        from . import sharded
        return getattr(sharded, name)
    if name == "parse_filters":  # no faiss needed to read --filter flags
        from .filters import parse_filters
        return parse_filters
    if name in ("Retriever", "build_index", "model_fingerprint"):
        from . import retriever
        return getattr(retriever, name)
    raise AttributeError(f"module 'xmodal.retrieval' has no attribute {name!r}")
