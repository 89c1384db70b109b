"""Which inputs a tower's folder of feature shards holds, looked up on disk: the key → row index of a cache too large
for RAM (10M rows), with no index of its own to keep in step with the shards.

Every shard :class:`~xmodal.feature_store.FeatureStore` writes stores its rows sorted by key (metadata ``order:
key``), so the shard is its own index: its ``keys`` region, memory-mapped as an array of 16-byte strings, is
binary-searched (``np.searchsorted``) for a whole batch of keys at once, and only the pages the search touches are
read. A process's heap holds the shard list, never the keys (benchmarks/feature_lookup.py: heap flat from 100k to
1M cached rows, where a dict of the keys grows with them; SQLite measured slower per batch and a second file to keep
consistent). Shards written before rows were sorted are sorted in memory when opened (they come from small,
manifest-sized caches).

A damaged or foreign shard is what :meth:`FeatureStore._check` says it is: reported once, removed, and its inputs
are embedded again. Picklable: a DataLoader worker gets the folder and the shards this process verified, and maps
the files again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .feature_store import KEY_BYTES, FeatureStore, _mapped

_KEY = f"S{KEY_BYTES}"


class FeatureIndex:
    """Key → features over one tower's shards (see the module docstring)."""

    def __init__(self, store: FeatureStore):
        self.store = store
        # (path, its keys in sorted order, the rows in that order where the file is not sorted, features)
        self._open: list[tuple[Path, np.ndarray, np.ndarray | None, np.ndarray]] = []
        self._known: set[Path] = set()

    def __getstate__(self):
        verified = {s for s in FeatureStore._verified if Path(s[0]).parent == self.store.folder}
        return {"folder": str(self.store.folder), "verified": verified}

    def __setstate__(self, state):
        FeatureStore._verified.update(state["verified"])  # a worker of a spawning platform: not checked again
        self.store = FeatureStore.__new__(FeatureStore)
        self.store.folder = Path(state["folder"])
        self._open, self._known = [], set()

    def __len__(self) -> int:
        return sum(len(k) for _, k, _, _ in self._open)

    def refresh(self) -> int:
        """Open the shards written since the last call (each checked: :meth:`FeatureStore._check`); the number of
        shards now open."""
        try:
            paths = self.store.shards()
        except OSError:  # the folder is gone: nothing cached
            paths = []
        for path in paths:
            if path in self._known:
                continue
            checked = self.store._check(path)
            if checked is None:
                continue
            header, start = checked
            keys = _mapped(path, header, start, "keys")
            keys = keys.reshape(-1).view(_KEY) if len(keys) else np.empty(0, _KEY)
            order = None
            if header.get("__metadata__", {}).get("order") != "key":  # an older shard: sorted here, in memory
                order = np.argsort(np.asarray(keys), kind="stable")
                keys = np.asarray(keys)[order]
            self._open.append((path, keys, order, _mapped(path, header, start, "features")))
            self._known.add(path)
        return len(self._open)

    def lookup(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        """Each key's features (a float32 row, read from disk) or None where no open shard holds it."""
        out: list[np.ndarray | None] = [None] * len(keys)
        if not keys or not self._open:
            return out
        wanted = np.frombuffer(b"".join(keys), _KEY)
        todo = np.arange(len(keys))
        for path, sorted_keys, order, features in self._open:
            if not len(todo) or not len(sorted_keys):
                continue
            pos = np.searchsorted(sorted_keys, wanted[todo])
            inside = pos < len(sorted_keys)
            found = np.zeros(len(todo), bool)
            # equal keys compared as two 8-byte words (numpy's string equality is ~10x slower)
            found[inside] = (_words(sorted_keys[pos[inside]]) == _words(wanted[todo[inside]])).all(1)
            rows = pos[found] if order is None else order[pos[found]]
            try:
                for i, row in zip(todo[found], rows):
                    out[i] = np.array(features[row])
            except OSError:  # removed under us (another process found it damaged): embedded again instead
                continue
            todo = todo[~found]
        return out



def _words(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys).view(np.uint64).reshape(-1, 2)
