"""Turn a validated manifest into batches: each tower's transform applied in DataLoader workers, then ``collate``.

    m = read_manifest("data/openclipart/manifest.csv", split="train")
    ds = ManifestDataset(m.rows, {"image": image_tower.transform, "text": text_tower.transform})
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2, collate_fn=collate)
    batch = next(iter(loader))   # {"image": float32 [64, 3, H, W], "text": int64 [64, L]}

Text with one of xmodal's tokenisers (``BPETokenize``, ``HFTokenize``: deterministic, no augmentation) is tokenised
once, when the dataset is built, instead of once per row per epoch: items then only index the ids. On the Open Clip
Art rows this made the image + text loader 1.1-1.3x faster and cut a training step's data wait by about a fifth at
``num_workers: 0`` (``benchmarks/data_pipeline.py``).

Random transforms (an image tower's crops and flips, an audio tower's random window) draw from torch's generator.
Given ``augment_seed``, each row's draws come from a generator seeded by ``(augment_seed, epoch, row)``
(:func:`row_seed`): the crops are a function of the position in the data, not of which worker loaded the row, how
far ahead the loader had fetched, or where a run was resumed, so a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from ..batch import collate  # noqa: F401  (xmodal.data.loader.collate, as before)


#: Pre-tokenise text columns of at most this many rows: the one-off cost is 0.2-0.3 ms of one core per row (at most
#: ~30 s, in the process that builds the dataset) and the ids take 4 B x context_length per row (int32; 24 MiB at
#: context 64). Larger datasets tokenise per row, in the loader's workers.
PRETOKENIZE_MAX_ROWS = 100_000


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood, OOPSLA 2014): a bijective, well-mixing 64-bit hash."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def row_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of ``row``'s random transforms in ``epoch``: the three chained through SplitMix64 (neighbouring rows
    and epochs get unrelated streams), as a non-negative 63-bit integer. Under a microsecond; numpy's
    ``SeedSequence`` took ~30 µs a row inside an image loader, 8 % of decoding a 64-px crop."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (row & _MASK64)) >> 1


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's CPU generator seeded by ``seed`` inside the block. In the main process its state is restored after
    (it also draws dropout masks); a DataLoader worker's generator serves only the transforms, so there it is left
    seeded (saving and restoring it cost ~15 µs a row)."""
    if get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        yield
        return
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: a GPU's is left alone
        torch.default_generator.manual_seed(seed)
        yield


def _is_tokenizer(transform: Any) -> bool:
    """xmodal's text tokenisers: deterministic str -> int64 [L], so their output can be computed once per row."""
    from ..modalities.text import BPETokenize, HFTokenize
    return type(transform) in (BPETokenize, HFTokenize)


class ManifestRowError(RuntimeError):
    """A row failed at training time (e.g. its file changed or vanished after validation).

    The message names the dataset index, the row's id and the field; the original exception is chained.
    """


class ManifestDataset(torch.utils.data.Dataset):
    """Rows of a manifest (``Manifest.rows``, or any ``datasets.Dataset``) →
    ``{modality: transforms[modality](value), **extra_columns}``.

    ``transforms`` maps each modality column to its tower's picklable transform (raw value → Tensor);
    ``extra_columns`` (e.g. ``["id", "label"]``) are passed through as plain Python values.

    ``pretokenize`` (default on): a column whose transform is one of xmodal's tokenisers is tokenised here, once
    (datasets of at most ``PRETOKENIZE_MAX_ROWS`` rows); items are the same int64 tensors the per-row path gives,
    and a value the tokeniser rejects raises the same ``ManifestRowError``, here instead of when the row is loaded.
    ``pretokenize=False`` tokenises per row, in ``__getitem__``.

    ``source`` and ``row_numbers`` (a :class:`~xmodal.data.manifest.Manifest`'s ``source`` and ``row_numbers``):
    errors then name the row as the file does (``data/m.csv: row 12 (id '0042')``) instead of by its index here.

    ``augment_seed``: the per-row transforms run with torch's CPU generator seeded by ``row_seed(augment_seed,
    epoch, index)`` (:func:`seeded`) — unless every one says ``random = False`` (a feature look-up, an image
    transform without augmentation) — ``epoch`` being what :meth:`set_epoch` last set (0 at first). The epoch
    lives in shared memory, so a persistent worker reads the value the main process set before the epoch's first
    batch was asked for. ``None`` (the default): they draw from the generator as it stands.
    """

    def __init__(self, dataset, transforms: Mapping[str, Callable[[Any], Any]], extra_columns: Sequence[str] = (),
                 pretokenize: bool = True, source: str | None = None, row_numbers: Sequence[int] | None = None,
                 augment_seed: int | None = None):
        self.source = source
        self.augment_seed = None if augment_seed is None else int(augment_seed)
        self._epoch = torch.zeros((), dtype=torch.int64)
        if self.augment_seed is not None:  # shared with the workers (one small shared-memory segment)
            self._epoch.share_memory_()
        self.row_numbers = list(row_numbers) if row_numbers else None
        if not transforms:
            raise ValueError("ManifestDataset needs at least one modality transform")
        self.transforms = dict(transforms)
        self.extra_columns = [c for c in extra_columns if c not in self.transforms]
        columns = dataset.column_names
        missing = [c for c in [*self.transforms, *self.extra_columns] if c not in columns]
        if missing:
            raise KeyError(f"dataset has no column(s) {missing} (columns: {', '.join(columns)})")
        self._has_id = "id" in columns
        wanted = list(dict.fromkeys([*self.transforms, *self.extra_columns, *(["id"] if self._has_id else [])]))
        self.dataset = dataset.select_columns(wanted) if len(wanted) < len(columns) else dataset
        # modality -> (ids [N, L] int32/int64, indices of rows without a value); those columns are not read per item
        self._tokens: dict[str, tuple[Tensor, frozenset[int]]] = {}
        if pretokenize and len(self.dataset) <= PRETOKENIZE_MAX_ROWS:
            for modality, transform in self.transforms.items():
                tokens = self._tokenize_column(modality, transform) if _is_tokenizer(transform) else None
                if tokens is not None:
                    self._tokens[modality] = tokens
        # the columns still read per item (the id only names a row in a per-row transform's error)
        per_row = [m for m in self.transforms if m not in self._tokens]
        # seeding costs ~20 µs a row in the main process: only where a transform may draw (one without a `random`
        # attribute is assumed to: a user's, an audio tower's random window)
        self._random = any(getattr(self.transforms[m], "random", True) for m in per_row)
        rest = [*per_row, *self.extra_columns, *(["id"] if self._has_id and per_row else [])]
        rest = list(dict.fromkeys(rest))
        self._rows = None if not rest else (self.dataset.select_columns(rest) if len(rest) < len(wanted)
                                            else self.dataset)

    def _tokenize_column(self, modality: str,
                         transform: Callable[[Any], Tensor]) -> tuple[Tensor, frozenset[int]] | None:
        """Every row's ids, or ``None`` (tokenise per row) when they are not one int64 ``[L]`` per row."""
        values = self.dataset[modality]
        out: list[Tensor | None] = []
        for index, value in enumerate(values):
            if value is None or value == "":
                out.append(None)
                continue
            try:
                out.append(transform(value))
            except Exception as e:  # noqa: BLE001 - the per-row path's message
                row = {"id": self.dataset[index]["id"]} if self._has_id else {}
                raise self._transform_error(index, row, modality, value, e) from e
        present = [t is not None for t in out]
        tensors = [t for t in out if t is not None]
        if not tensors or any(t.dtype != torch.int64 or t.shape != tensors[0].shape or t.ndim != 1 for t in tensors):
            return None
        ids = torch.zeros(len(out), tensors[0].shape[0], dtype=torch.int64)
        ids[torch.tensor(present)] = torch.stack(tensors)
        if ids.numel() and -2 ** 31 <= int(ids.min()) and int(ids.max()) < 2 ** 31:
            ids = ids.to(torch.int32)  # half the memory; items are converted back to int64
        return ids, frozenset(i for i, p in enumerate(present) if not p)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next items belong to (it seeds their random transforms, with ``augment_seed``)."""
        self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if self.augment_seed is None or not self._random:
            return self._item(index)
        with seeded(row_seed(self.augment_seed, int(self._epoch), index + len(self) if index < 0 else index)):
            return self._item(index)

    def _item(self, index: int) -> dict[str, Any]:
        try:
            row = self._rows[index] if self._rows is not None else {}
            if self._rows is None and not -len(self) <= index < len(self):
                raise IndexError(f"index {index} is out of range for {len(self)} rows")
        except Exception as e:  # noqa: BLE001 - e.g. an embedded image that no longer decodes
            raise ManifestRowError(f"{self._row(index)}: cannot read the row from the dataset: "
                                   f"{type(e).__name__}: {e}") from e
        item: dict[str, Any] = {}
        for modality, transform in self.transforms.items():
            if modality in self._tokens:
                ids, missing = self._tokens[modality]
                i = index + len(ids) if index < 0 else index
                item[modality] = None if i in missing else ids[i].to(torch.int64, copy=True)
                continue
            value = row[modality]
            if value is None or value == "":
                item[modality] = None  # this row lacks the modality: collate masks it out
                continue
            try:
                item[modality] = transform(value)
            except Exception as e:  # noqa: BLE001 - name the row, keep the cause
                raise self._transform_error(index, row, modality, value, e) from e
        for c in self.extra_columns:
            item[c] = row[c]
        return item

    def _transform_error(self, index: int, row: Mapping[str, Any], modality: str, value: Any,
                         e: Exception) -> ManifestRowError:
        shown = value if isinstance(value, str) else type(value).__name__
        return ManifestRowError(f"{self._row(index)}{self._id(row)}: field '{modality}': transform failed on "
                                f"{shown!r:.200}: {type(e).__name__}: {e}")

    def _row(self, index: int) -> str:
        """``row <index>``, or with ``source``: ``<source>: row <1-based data row of the file>``."""
        if self.source is None:
            return f"row {index}"
        i = index + len(self) if index < 0 else index
        number = self.row_numbers[i] if self.row_numbers and 0 <= i < len(self.row_numbers) else i + 1
        return f"{self.source}: row {number}"

    def _id(self, row: Mapping[str, Any]) -> str:
        return f" (id {row['id']!r})" if self._has_id else ""
