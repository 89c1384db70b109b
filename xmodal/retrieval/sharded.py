"""An index split into shards: each shard an ordinary index folder, searched together with an exact merge.

On disk::

    NAME/
      shards.json          {"format": "xmodal-sharded-index", "version": 1, "next_slot": 3,
                            "shards": [{"slot": 0, "dir": "shard-0-1"}, {"slot": 2, "dir": "shard-2-1"}]}
      shard-0-1/           an EmbeddingIndex folder (index.faiss, metadata.arrow, index.json)
      shard-2-1/

Each shard is built on its own (another process, another machine: ``xmodal index --out PART``) and joined with
:meth:`ShardedIndex.add_shard`; :meth:`ShardedIndex.replace_shard` swaps one for a new build. Both write the shard
into a fresh folder first and then replace ``shards.json`` atomically — **the commit point**: a crash before it leaves
the old set (the half-written folder is an orphan, removed by the next change), a crash after it the new one.

Ids: a hit's id is ``slot · 2^40 + the shard's own row id`` (:data:`SLOT_BITS`): stable while the shard stays, and
never reused, since slots are not. Search asks every shard for its top ``k`` (in threads: faiss releases the GIL)
and merges them exactly: the overall top ``k`` by score is among the shards' top ``k``'s, so a sharded flat index
returns the single index's hits and scores. Equal scores are listed as faiss lists them (largest id first). One
case has no fixed answer: exact ties straddling the ``k``-th place (identical vectors in several shards, some
inside the top ``k`` and some not) — faiss keeps whichever its scan meets in a given order, and the merge keeps the
smallest ids.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import fsync_dir, write_text
from . import IndexCorruptError, RetrievalError
from .index import EmbeddingIndex, Hit

SHARDS_NAME = "shards.json"
FORMAT = "xmodal-sharded-index"
SLOT_BITS = 40


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARDS_NAME).is_file()


def open_index(path: str | Path):
    """The index in folder ``path``: a :class:`ShardedIndex` if it holds ``shards.json``, else an
    :class:`~xmodal.retrieval.index.EmbeddingIndex`."""
    return ShardedIndex.load(path) if is_sharded(path) else EmbeddingIndex.load(path)


class ShardedIndex:
    """Shards searched as one index; the read side of :class:`EmbeddingIndex` (``search``, ``metadata``, ``ids``,
    ``len``, ``in``, ``kind``, ``dim``, ``options``, ``model_info``), so a :class:`Retriever` and ``xmodal serve``
    take either."""

    def __init__(self, path: Path, shards: dict[int, EmbeddingIndex], dirs: dict[int, str], next_slot: int):
        self.path, self.shards, self._dirs, self._next_slot = path, shards, dirs, next_slot
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, len(shards))))

    # ------------------------------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | Path) -> "ShardedIndex":
        """An empty sharded index in the (new or empty) folder ``path``."""
        path = Path(path).absolute()
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path} is not empty; a sharded index starts in a new folder")
        path.mkdir(parents=True, exist_ok=True)
        self = cls(path, {}, {}, 0)
        self._commit()
        return self

    @classmethod
    def load(cls, path: str | Path) -> "ShardedIndex":
        path = Path(path).absolute()
        try:
            info = json.loads((path / SHARDS_NAME).read_text(encoding="utf-8"))
            if info.get("format") != FORMAT:
                raise ValueError("not an xmodal sharded index description")
            dirs = {int(s["slot"]): str(s["dir"]) for s in info["shards"]}
            next_slot = int(info["next_slot"])
        except FileNotFoundError:
            raise FileNotFoundError(f"no sharded index at {path}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise IndexCorruptError(f"index {path}: bad {SHARDS_NAME}: {e}") from None
        shards = {slot: EmbeddingIndex.load(path / d, repair=False) for slot, d in dirs.items()}
        self = cls(path, shards, dirs, next_slot)
        self._check()
        return self

    def _check(self, *extra: EmbeddingIndex) -> None:
        every = list(self.shards.values()) + list(extra)
        dims = {s.dim for s in every}
        models = {(s.model_info or {}).get("sha256") for s in every}
        if len(dims) > 1 or len(models) > 1:
            raise RetrievalError(f"sharded index {self.path}: shards disagree (dimensions {sorted(dims)}, "
                                 f"{len(models)} different models); every shard must come from one model")

    def check_additions(self, *extra: EmbeddingIndex) -> None:
        """Refuse, before anything is written, shards that disagree with the others (dimension, model) or hold a row
        whose manifest ``id`` another shard holds too: the same item twice in the hits, most often the same index
        added twice. Costs one pass over the shards' metadata."""
        self._check(*extra)
        owner: dict = {}
        for where, index in [(f"shard {s}", x) for s, x in self.shards.items()] + [
                (f"new part {i + 1}", x) for i, x in enumerate(extra)]:
            for rid in index.metadata_column("id"):
                if rid is not None and owner.setdefault(rid, where) != where:
                    raise RetrievalError(f"sharded index {self.path}: row id {rid!r} is in {owner[rid]} and in "
                                         f"{where}; each item belongs to one shard (the same index added twice?)")

    # ------------------------------------------------------------------------------------------------ changes
    def add_shard(self, index: EmbeddingIndex | str | Path) -> int:
        """Add a shard (an index or its folder, copied in); return its slot."""
        index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.load(index)
        self.check_additions(index)
        slot = self._next_slot
        self._next_slot += 1
        self._install(slot, index)
        return slot

    def replace_shard(self, slot: int, index: EmbeddingIndex | str | Path) -> None:
        """Replace the shard in ``slot`` by a new build; its hits keep the slot (ids from the new shard's rows)."""
        if slot not in self.shards:
            raise RetrievalError(f"sharded index {self.path} has no shard {slot} (slots: {sorted(self.shards)})")
        index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.load(index)
        others = {s: x for s, x in self.shards.items() if s != slot}
        ShardedIndex(self.path, others, {}, 0).check_additions(index)
        self._install(slot, index)

    def remove_shard(self, slot: int) -> None:
        if slot not in self.shards:
            raise RetrievalError(f"sharded index {self.path} has no shard {slot} (slots: {sorted(self.shards)})")
        del self.shards[slot], self._dirs[slot]
        self._commit()

    def _install(self, slot: int, index: EmbeddingIndex) -> None:
        generation = 1 + max([int(p.name.rsplit("-", 1)[1]) for p in self.path.glob(f"shard-{slot}-*")
                              if p.name.rsplit("-", 1)[1].isdigit()] or [0])
        name = f"shard-{slot}-{generation}"
        index.save(self.path / name)
        self.shards[slot], self._dirs[slot] = index, name
        self._commit()

    def _commit(self) -> None:
        """Replace shards.json (the commit point), then remove the folders it no longer names."""
        info = {"format": FORMAT, "version": 1, "next_slot": self._next_slot,
                "shards": [{"slot": s, "dir": self._dirs[s]} for s in sorted(self._dirs)]}
        write_text(self.path / SHARDS_NAME, json.dumps(info, indent=2))
        fsync_dir(self.path)
        named = set(self._dirs.values())
        for p in self.path.iterdir():
            if p.is_dir() and p.name.lstrip(".").startswith("shard-") and p.name not in named:
                shutil.rmtree(p, ignore_errors=True)
        if len(self.shards) > self._pool._max_workers:
            self._pool = ThreadPoolExecutor(max_workers=min(8, len(self.shards)))

    # ------------------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return sum(len(s) for s in self.shards.values())

    def __repr__(self) -> str:
        return f"ShardedIndex({self.path}, shards={sorted(self.shards)}, rows={len(self)})"

    @staticmethod
    def split_id(id: int) -> tuple[int, int]:
        return int(id) >> SLOT_BITS, int(id) & ((1 << SLOT_BITS) - 1)

    def __contains__(self, id: int) -> bool:
        slot, local = self.split_id(id)
        return slot in self.shards and local in self.shards[slot]

    def metadata(self, id: int) -> dict:
        slot, local = self.split_id(id)
        if slot not in self.shards:
            raise KeyError(id)
        return self.shards[slot].metadata(local)

    def ids(self) -> np.ndarray:
        parts = [(slot << SLOT_BITS) + s.ids() for slot, s in sorted(self.shards.items())]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def metadata_keys(self) -> list[str]:
        return sorted({k for s in self.shards.values() for k in s.metadata_keys()})

    @property
    def kind(self) -> str:
        kinds = {s.kind for s in self.shards.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def dim(self) -> int:
        return next(iter(self.shards.values())).dim if self.shards else 0

    @property
    def options(self) -> dict:
        return {"shards": {slot: dict(s.options) for slot, s in sorted(self.shards.items())}}

    @property
    def model_info(self) -> dict | None:
        return next(iter(self.shards.values())).model_info if self.shards else None

    def search(self, queries: Any, k: int = 10, filter=None, **opts: Any) -> list[list[Hit]]:
        """Every shard's top ``k`` (in parallel), merged exactly; same arguments and result as
        :meth:`EmbeddingIndex.search`, with ids ``slot · 2^40 + row id``."""
        if not self.shards:
            raise RetrievalError(f"sharded index {self.path} has no shards")
        known = self.metadata_keys()
        slots = sorted(self.shards)
        if isinstance(filter, dict) and any(key not in known for key in filter):
            return self.shards[slots[0]].search(queries, k, filter, **opts)  # its error names the keys there are
        per_shard = list(self._pool.map(lambda s: self._shard_search(s, queries, k, filter, opts), slots))
        return [_merge([hits[q] for hits in per_shard], k) for q in range(len(per_shard[0]))]

    def _shard_search(self, slot: int, queries: Any, k: int, filter, opts: dict) -> list[list[Hit]]:
        shard = self.shards[slot]
        if isinstance(filter, dict) and any(key not in shard.metadata_keys() for key in filter):
            q = queries.detach().cpu().numpy() if hasattr(queries, "detach") else np.asarray(queries)
            return [[] for _ in range(1 if q.ndim == 1 else len(q))]  # no row of this shard can match
        base = slot << SLOT_BITS
        rows = shard.search(queries, k, filter, **opts)
        for row in rows:  # the shard's own fresh hits: renumbered in place, their metadata still unread (LazyHit)
            for h in row:
                h.id += base
        return rows


def _merge(rows: list[list[Hit]], k: int) -> list[Hit]:
    """The top ``k`` of the shards' hits: kept by (score desc, id asc), listed by (score desc, id desc) — the order
    faiss flat lists ties in (see :mod:`~xmodal.retrieval.exact`)."""
    hits = sorted((h for row in rows for h in row), key=lambda h: (-h.score, h.id))[:k]
    return sorted(hits, key=lambda h: (-h.score, -h.id))
