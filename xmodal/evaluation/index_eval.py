"""Recall@K and mAP of an index, measured through :meth:`Retriever.search` — the path users' queries take.

    from xmodal.retrieval import Retriever
    from xmodal.evaluation.index_eval import evaluate_index, evaluate_index_manifest
    r = Retriever("indexes/clipart-test")
    evaluate_index(r, ["a red car", "a cat"], [{"cars/red_01"}, {"animals/cat_01", "animals/cat_02"}])
    evaluate_index_manifest(r, "data/openclipart/manifest.csv", "text", split="test")

Definitions (per query, then averaged over the queries that have at least one relevant item in the index):

* **Recall@K** — 1 if a relevant item is among the top ``K`` hits, else 0 (the rank of the *best* relevant item is
  ``<= K``): the definition of :func:`xmodal.evaluation.metrics.retrieval_ranks` / ``recall_at_k`` used by
  ``xmodal evaluate``. One difference: ``evaluate`` resolves exactly tied scores in the query's favour, while an
  index returns tied items in faiss's order. A corpus with duplicate files (Open Clip Art's test split holds 58 pairs
  of drawings with identical embeddings) can so score a lower R@1 here than in ``evaluate`` (the quickstart's model:
  0.368 against 0.390, text → image; R@5 and R@10 equal); which duplicate comes first may hang on float rounding.
* **AP** — average precision over the ranking (:func:`xmodal.evaluation.metrics.ranked_average_precision`),
  ``AP = (1/|R|) * sum over the ranks r of relevant hits of precision@r``, where ``R`` is the set of relevant items
  in the index. With ``depth`` (hits fetched per query) below the index size, relevant items not retrieved count as
  precision 0 (as trec_eval does); the default depth is the whole index, which gives the exact AP. **mAP** is the
  mean of AP over the queries.

Relevant items are named by a metadata key of the index rows (``key="id"``: the manifest ids; ``"value"``: the path or
text; ``"label"``; or ``"index_id"``); names that match no row are dropped (counted in ``n_relevant_missing``), and a
query left with none is skipped (``n_queries_skipped``).

The command line is ``xmodal evaluate-index`` (:mod:`xmodal.cli.evaluate`).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Iterable, Sequence

from ..retrieval import RetrievalError
from .metrics import ranked_average_precision

KS = (1, 5, 10)


def _item_keys(index, key: str) -> dict[Any, set[int]]:
    """metadata[key] (as a string) → the index ids of the rows that have it."""
    out: dict[Any, set[int]] = defaultdict(set)
    for i in index.ids().tolist():
        v = i if key == "index_id" else index.metadata(i).get(key)
        if v is not None:
            out[str(v)].add(int(i))
    return out


def evaluate_index(retriever, queries: Sequence[Any], relevant: Sequence[Iterable[Any]], modality: str = "text",
                   ks: Sequence[int] = KS, *, key: str = "id", depth: int | None = None, filter: Any = None,
                   batch_size: int = 64, search_opts: dict | None = None) -> dict[str, float]:
    """Recall@K for each ``k`` in ``ks`` and mAP of ``retriever`` on labelled queries.

    ``queries``: raw query values of ``modality`` (texts, image paths, ...), searched with
    ``retriever.search(queries[i:i + batch_size], modality, k=depth, filter=filter, **search_opts)``.
    ``relevant[i]``: the names (``metadata[key]``) of the items relevant to ``queries[i]``. ``depth``: hits fetched
    per query (default: every row, so AP is exact; at least ``max(ks)`` or the index size).

    Returns ``{"R@1", "R@5", "R@10", "mAP", "n_queries", "n_items", "n_queries_skipped", "n_relevant_missing",
    "depth"}``.
    """
    if len(queries) != len(relevant):
        raise ValueError(f"evaluate_index: {len(queries)} queries but {len(relevant)} relevance sets")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"evaluate_index: ks must be positive integers, got {ks}")
    index = retriever.index
    n_items = len(index)
    if n_items == 0:
        raise RetrievalError("evaluate_index: the index is empty")
    depth = n_items if depth is None else int(depth)
    if depth < min(max(ks), n_items):  # (a k above the index size is fine: every row is in the top k)
        raise ValueError(f"evaluate_index: depth {depth} is below the largest k {max(ks)}")
    depth = min(depth, n_items)
    names = _item_keys(index, key)
    targets: list[set[int]] = []
    kept: list[Any] = []
    skipped = missing = 0
    for q, rel in zip(queries, relevant):
        rel = [rel] if isinstance(rel, (str, int)) else list(rel)
        ids: set[int] = set()
        for name in rel:
            found = names.get(str(name))
            if found:
                ids |= found
            else:
                missing += 1
        if ids:
            kept.append(q)
            targets.append(ids)
        else:
            skipped += 1
    if not kept:
        raise RetrievalError("evaluate_index: no query has a relevant item in the index (check `key` and the "
                             "relevance names)")
    hit_at = {k: 0 for k in ks}
    ap_sum = 0.0
    for start in range(0, len(kept), batch_size):
        batch = kept[start:start + batch_size]
        results = retriever.search(list(batch), modality, k=depth, filter=filter, **(search_opts or {}))
        for hits, want in zip(results, targets[start:start + batch_size]):
            flags = [h.id in want for h in hits]
            first = next((r for r, f in enumerate(flags, 1) if f), None)
            for k in ks:
                hit_at[k] += first is not None and first <= k
            ap_sum += ranked_average_precision(flags, len(want))
    n = len(kept)
    out = {f"R@{k}": hit_at[k] / n for k in ks}
    out["mAP"] = ap_sum / n
    out.update({"n_queries": float(n), "n_items": float(n_items), "n_queries_skipped": float(skipped),
                "n_relevant_missing": float(missing), "depth": float(depth)})
    return out


def manifest_queries(dataset, query_modality: str, item_modality: str, relevance: str = "pair"
                     ) -> tuple[list[Any], list[set[str]], str]:
    """Distinct query values of a manifest and their relevant item names: ``(queries, relevant, key)``.

    ``relevance="pair"``: the items relevant to a query value are the ``item_modality`` values it shares a row with
    (matched on the index's ``value`` metadata, so duplicates of one image all count; five captions of one image are
    five queries with that image relevant). ``"label"``: every item with the query row's ``label``.
    """
    cols = dataset.column_names
    if query_modality not in cols:
        raise RetrievalError(f"the manifest has no {query_modality!r} column (columns: {', '.join(cols)})")
    if relevance == "pair":
        if item_modality not in cols:
            raise RetrievalError(f"relevance 'pair' needs the manifest's {item_modality!r} column (the indexed "
                                 f"modality); columns: {', '.join(cols)}")
        other, key = item_modality, "value"
    elif relevance == "label":
        if "label" not in cols:
            raise RetrievalError("relevance 'label' needs a `label` column in the manifest")
        other, key = "label", "label"
    else:
        raise ValueError(f"relevance must be 'pair' or 'label', got {relevance!r}")
    rel: dict[Any, set[str]] = {}
    for q, target in zip(dataset[query_modality], dataset[other]):
        if q is None or target is None or (isinstance(q, str) and not q.strip()) or str(target) == "":
            continue
        if isinstance(q, dict):  # datasets.Image / Audio cell
            q = q.get("path")
        if isinstance(target, dict):
            target = target.get("path")
        rel.setdefault(q, set()).add(str(target))
    return list(rel), list(rel.values()), key


def evaluate_index_manifest(retriever, manifest: Any, query_modality: str, *, split: str | None = None,
                            relevance: str = "pair", ks: Sequence[int] = KS, depth: int | None = None,
                            filter: Any = None, batch_size: int = 64, max_rows: int | None = None,
                            allow_outside_root: bool = True, on_bad_row: str = "error",
                            root: str | os.PathLike | None = None) -> dict[str, float]:
    """:func:`evaluate_index` with the queries and relevance of a manifest (see :func:`manifest_queries`).

    ``manifest``: a path (read with :func:`xmodal.data.read_manifest`, relative paths resolved against ``root``,
    default the manifest's folder, as when the index was built), a :class:`~xmodal.data.Manifest` or a
    ``datasets.Dataset``.
    """
    item_modality = retriever.modality
    if item_modality is None:
        raise RetrievalError("the index records no modality; cannot match manifest rows to its items")
    if isinstance(manifest, (str, os.PathLike)):
        from ..data import read_manifest
        manifest = read_manifest(manifest, split=split, modalities=None, max_rows=max_rows, require_all=False,
                                 root=root, allow_outside_root=allow_outside_root, on_bad_row=on_bad_row)
    ds = getattr(manifest, "dataset", manifest)
    queries, relevant, key = manifest_queries(ds, query_modality, item_modality, relevance)
    if not queries:
        raise RetrievalError(f"the manifest has no rows with both a {query_modality!r} value and a relevance target")
    out = evaluate_index(retriever, queries, relevant, query_modality, ks, key=key, depth=depth, filter=filter,
                         batch_size=batch_size)
    return {f"{query_modality}->{item_modality}/{name}": v for name, v in out.items()}
