"""A search result and its printed forms — light (no faiss, numpy or torch), so that ``xmodal query --server``
prints what a running ``xmodal serve`` answered without loading a model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..modalities.registry import path_modalities

# Keys of a hit's dict (:meth:`Hit.to_dict`, the CLI's ``query --json``, ``POST /api/search``) that xmodal itself
# fills; a metadata field of the same name (a manifest column called ``score``, ``rank``, ...) never replaces them.
RESERVED_HIT_KEYS = ("rank", "index_id", "score", "thumb", "metadata")


@dataclass
class Hit:
    """One search result: the index's row id, the inner-product score (cosine for normalised vectors), metadata."""

    id: int
    score: float
    metadata: dict = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:  # a LazyHit equals the Hit it stands for
        if not isinstance(other, Hit):
            return NotImplemented
        return (self.id, self.score, self.metadata) == (other.id, other.score, other.metadata)

    def __repr__(self) -> str:
        return f"Hit(id={self.id!r}, score={self.score!r}, metadata={self.metadata!r})"

    def to_dict(self) -> dict:
        """``{"index_id", "score", ...metadata, "metadata": {...}}``.

        ``index_id`` and ``score`` are always the row id and the similarity. The metadata fields are copied to the
        top level for convenience, except those named like a reserved key (:data:`RESERVED_HIT_KEYS`: ``rank``,
        ``index_id``, ``score``, ``thumb``, ``metadata``); ``"metadata"`` holds the row's complete metadata record
        as stored, so a manifest column called ``score`` is ``hit["metadata"]["score"]``.
        """
        out: dict = {"index_id": self.id, "score": self.score}
        out.update((k, v) for k, v in self.metadata.items() if k not in RESERVED_HIT_KEYS)
        out["metadata"] = dict(self.metadata)
        return out


class LazyHit(Hit):
    """A :class:`Hit` whose metadata is read from the index's columns when first asked for: a search that only wants
    ids and scores (the sharded merge, ``--json`` of ids, a benchmark against raw faiss) never decodes metadata, and
    the first hit of a result to need it reads every hit of that result in one pass (``rows.get``)."""

    def __init__(self, id: int, score: float, rows, j: int):  # noqa: A002 (the field's name)
        self.id, self.score, self._rows, self._j, self._metadata = id, score, rows, j, None

    @property  # type: ignore[override]
    def metadata(self) -> dict:
        if self._metadata is None:
            self._metadata = self._rows.get(self._j)
        return self._metadata

    @metadata.setter
    def metadata(self, value: dict) -> None:
        self._metadata = value


def format_hits(hits: Sequence[Hit | dict], width: int = 80) -> str:
    """A text table of hits (``Hit`` objects, or their dicts as ``POST /api/search`` returns them): rank, score, id
    (the manifest id), label, value (path or text, shortened)."""
    if not hits:
        return "no results"
    rows = [("rank", "score", "id", "label", "value")]
    for r, h in enumerate(hits, 1):
        meta, score, index_id = ((h.metadata, h.score, h.id) if isinstance(h, Hit) else
                                 (h.get("metadata", h), h["score"], h.get("index_id")))
        value = "" if meta.get("value") is None else str(meta.get("value")).replace("\n", " ")
        if len(value) > width:
            value = "…" + value[-(width - 1):] if meta.get("modality") in path_modalities() else value[:width - 1] + "…"
        label = meta.get("label")
        rows.append((str(r), f"{score:.4f}", str(meta.get("id", index_id)), "" if label is None else str(label), value))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]),
                                row[3].ljust(widths[3]), row[4]]).rstrip() for row in rows)
