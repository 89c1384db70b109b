"""An index together with the model that embeds it: fingerprints, building from a manifest, and queries.

* :func:`model_fingerprint` — what identifies the model of an index (weights sha256, embedding size, run folder).
* :func:`build_index` — embed one modality column of a manifest and save the index (or append to an existing one).
* :class:`Retriever` — an index plus the model that made it (checked by fingerprint); queries of any modality the
  model has (text → images, image → images, ...).
* :func:`format_hits` — hits as a text table (the CLI's output).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import FingerprintMismatchError, IndexCorruptError, RetrievalError
from .filters import Filter
from ..modalities.registry import path_modalities
from .hits import Hit, format_hits  # noqa: F401 (xmodal.retrieval.retriever.format_hits, as before)
from .index import EmbeddingIndex
from .sharded import ShardedIndex, open_index
from .index_files import _looks_like_index

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- fingerprints

_SHA_CACHE: dict[tuple, str] = {}


def _sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _weights_sha256(model: Any) -> str:
    """sha256 of the ``model.safetensors`` that ``model.save()`` would write (same bytes as the run folder's file
    for a model loaded from it and unchanged since)."""
    import torch
    from safetensors.torch import save_model

    if not isinstance(model, torch.nn.Module):
        raise RetrievalError(f"cannot fingerprint a {type(model).__name__}: pass the run folder (run_dir=) instead")
    with tempfile.TemporaryDirectory(prefix="xmodal-fp-") as tmp:
        p = Path(tmp) / "model.safetensors"
        save_model(model, str(p))
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def _embed_dim(model: Any) -> int:
    return int(model.cfg.embed_dim)


def _model_modalities(model: Any) -> list[str]:
    mods = getattr(model, "modalities", None)
    if mods is None:
        mods = list(getattr(getattr(model, "cfg", None), "towers", {}) or [])
    return list(mods)


def model_fingerprint(model: Any, modality: str, run_dir: str | os.PathLike | None = None) -> dict:
    """``{"run_dir", "sha256", "embed_dim", "modality"}`` identifying the model that embeds an index.

    ``model`` may be a run folder (its ``model.safetensors`` is hashed, ``embed_dim`` read from ``model.json``) or a
    model object: with ``run_dir`` the run folder's weights file is hashed (the caller vouches that the object was
    loaded from it), without it the object's weights are serialised as ``model.save()`` would and hashed.
    """
    from ..model import CARD_NAME, WEIGHTS_NAME

    if isinstance(model, (str, os.PathLike)):
        run = Path(model).absolute()
        weights, card = run / WEIGHTS_NAME, run / CARD_NAME
        if not weights.is_file() or not card.is_file():
            raise FileNotFoundError(f"{run}: not an xmodal run folder (needs {CARD_NAME} and {WEIGHTS_NAME})")
        try:
            embed_dim = int(json.loads(card.read_text(encoding="utf-8"))["model"].get("embed_dim", 256))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RetrievalError(f"{card}: cannot read embed_dim: {e}") from None
        return {"run_dir": str(run), "sha256": _sha256_file(weights), "embed_dim": embed_dim, "modality": modality}
    if run_dir is not None:
        run = Path(run_dir).absolute()
        weights = run / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{run}: no {WEIGHTS_NAME} (not an xmodal run folder)")
        return {"run_dir": str(run), "sha256": _sha256_file(weights), "embed_dim": _embed_dim(model),
                "modality": modality}
    return {"run_dir": None, "sha256": _weights_sha256(model), "embed_dim": _embed_dim(model), "modality": modality}


def _same_weights_as_recorded_run(model: Any, recorded: dict | None) -> bool:
    """The in-memory ``model`` holds exactly the weights of the recorded run folder's file, which is still the one
    the index was built from (same sha256), though ``model.save()`` would write other bytes: a file from an older
    format (e.g. 0-d learnable scalars, read back as 1-element tensors). Compared tensor by tensor, shapes of one
    element taken as equal."""
    import torch
    from safetensors.torch import load_file

    from ..model import WEIGHTS_NAME

    run = (recorded or {}).get("run_dir")
    weights = Path(run) / WEIGHTS_NAME if run else None
    if (weights is None or not weights.is_file() or not isinstance(model, torch.nn.Module)
            or _sha256_file(weights) != recorded.get("sha256")):
        return False
    saved, live = load_file(str(weights)), model.state_dict()
    if saved.keys() != live.keys():
        return False
    for k, v in saved.items():
        w = live[k].detach().cpu()
        if v.dtype != w.dtype or (v.shape != w.shape and not (v.numel() == w.numel() == 1)):
            return False
        if not torch.equal(v.reshape(w.shape), w):
            return False
    return True


def _check_fingerprint(recorded: dict | None, fp: dict, where: str) -> None:
    if not recorded:
        return
    if recorded.get("sha256") != fp["sha256"] or int(recorded.get("embed_dim", -1)) != fp["embed_dim"]:
        made_by = recorded.get("run_dir") or "an in-memory model"
        given = fp.get("run_dir") or "the given in-memory model"
        raise FingerprintMismatchError(
            f"{where} was built by the model in {made_by} (weights sha256 {str(recorded.get('sha256'))[:12]}…, "
            f"embed_dim {recorded.get('embed_dim')}), but the query model {given} differs (sha256 "
            f"{fp['sha256'][:12]}…, embed_dim {fp['embed_dim']}): its embeddings live in another space. Query with "
            f"the model that built the index, or rebuild the index with `xmodal index`.")


# ------------------------------------------------------------------------------------------------- build / query

# Metadata fields build_index fills for every item; a manifest column of the same name (other than ``id``, which
# is the item's id) is stored as ``manifest_<name>`` instead of replacing them.
OWN_META_KEYS = ("modality", "value")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def build_index(model: Any, manifest: Any, modality: str, out_dir: str | os.PathLike, kind: str | None = None,
                batch_size: int = 64, run_dir: str | os.PathLike | None = None, *, append: bool = False,
                overwrite: bool = False, progress: bool = True, tune: dict | None = None,
                dim: int | None = None, hubness: tuple | None = None, **opts: Any) -> EmbeddingIndex:
    """Embed the ``modality`` column of ``manifest`` (a :class:`xmodal.data.Manifest` or a ``datasets.Dataset``)
    with ``model`` and save the index atomically to ``out_dir``.

    Rows whose ``modality`` cell is empty are skipped. Each row's metadata: ``id``, ``modality``, ``value`` (the path
    or text), ``label`` and every other scalar column (a column named ``modality`` or ``value`` is stored as
    ``manifest_modality`` / ``manifest_value``). ``run_dir`` (the run folder the model was loaded from) is
    recorded with the model fingerprint so :class:`Retriever` can load the model by itself; without it the index only
    records the fingerprint of the in-memory weights.

    ``out_dir`` already holding an index: with ``append=True`` the rows whose manifest ``id`` is not yet in the index
    are embedded and added (the model must have the index's fingerprint; the rows skipped as already present are
    logged as a warning, with their first ids); with ``overwrite=True`` it is replaced;
    otherwise ``FileExistsError``. ``kind`` (default ``"flat"``) and ``opts`` (``M``, ``ef_construction``,
    ``ef_search``, ``nlist``, ``nprobe``, ``m``, ``nbits``, ``rescore``) apply to a new index.

    ``dim``: index the first ``dim`` coordinates of each embedding, renormalised (``model.encode(..., dim=)``; for
    models trained with ``model.matryoshka_dims``); recorded as the fingerprint's ``"dim"``, and queries through
    :class:`Retriever` are embedded the same way.

    ``hubness=(Hubness, bank)``: each row's hubness penalty against the query ``bank`` (embeddings of the queries'
    modality, e.g. the training captions; :mod:`.hubness`) is stored in its metadata and the method in
    ``index.json``; ``Retriever.search(..., hubness=True)`` then ranks by ``score − penalty``.

    ``tune={"target": 0.95, "modality": "text", "values": [...]}``: held-out queries (embedded with the model) on
    which the index's search setting is set to the smallest reaching that recall@10 against exact search over the
    new vectors (:func:`~xmodal.retrieval.tuning.tune`; the result is ``index.tuning``, saved with the index).
    """
    opts = {k: v for k, v in opts.items() if v is not None}
    ds = getattr(manifest, "dataset", manifest)
    columns = list(ds.column_names)
    if modality not in columns:
        raise RetrievalError(f"the manifest has no {modality!r} column (columns: {', '.join(columns)})")
    mods = _model_modalities(model)
    if modality not in mods:
        raise RetrievalError(f"the model has no {modality!r} tower (towers: {', '.join(mods)})")
    out = Path(out_dir).absolute()
    fp = model_fingerprint(model, modality, run_dir=run_dir)
    if dim is not None:
        if not 0 < int(dim) <= fp["embed_dim"]:
            raise RetrievalError(f"dim must be between 1 and the model's embed_dim {fp['embed_dim']}, got {dim}")
        fp["dim"] = int(dim)
    width = fp.get("dim") or fp["embed_dim"]
    as_prefix = {"dim": fp["dim"]} if dim is not None else {}

    index: EmbeddingIndex | None = None
    existing = None
    if out.is_dir() and any(out.iterdir()) and not _looks_like_index(out):
        raise FileExistsError(f"{out} is a non-empty folder that is not an xmodal index; choose another output "
                              f"folder")
    if not (out.is_dir() and not any(out.iterdir())):  # an empty folder is simply where the new index goes
        try:
            existing = EmbeddingIndex.load(out)
        except FileNotFoundError:
            pass
        except IndexCorruptError as e:
            if not overwrite:
                raise IndexCorruptError(f"{e}; or replace it with --overwrite (overwrite=True)") from None
    if existing is not None:
        if append:
            index = existing
            _check_fingerprint(index.model_info, fp, f"index {out}")
            if index.model_info and index.model_info.get("modality") not in (None, modality):
                raise RetrievalError(f"index {out} holds {index.model_info['modality']!r} embeddings; cannot append "
                                     f"{modality!r} rows")
            if kind is not None and kind != index.kind:
                raise RetrievalError(f"index {out} is a {index.kind!r} index; cannot append as {kind!r}")
            if fp.get("run_dir"):
                index.model_info = {**(index.model_info or {}), **fp}
        elif not overwrite:
            raise FileExistsError(f"{out} already holds an index ({len(existing)} rows); append to it with --append "
                                  f"(append=True) or replace it with --overwrite (overwrite=True)")
    if index is None:
        index = EmbeddingIndex(width, kind or "flat", model_info=fp, **opts)
    if width != index.dim:
        raise FingerprintMismatchError(f"the model embeds into {width} dimensions, index {out} holds "
                                       f"{index.dim}")

    present = {str(v) for v in index.metadata_column("id")} if append else set()
    values = ds[modality]
    ids = [str(i) for i in ds["id"]] if "id" in columns else [str(i + 1) for i in range(len(values))]
    extra = []  # other scalar columns, in manifest order
    for c in columns:
        if c in ("id", modality):
            continue
        col = ds[c]
        if all(_scalar(v) for v in col):
            key = f"manifest_{c}" if c in OWN_META_KEYS else c
            if key != c:
                log.warning("build_index: the manifest column %r is stored as %r (%r is the indexed item's own "
                            "field)", c, key, c)
            extra.append((key, col))
    inputs, metas, empty, dup, dup_ids = [], [], 0, 0, []
    for r, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            empty += 1
            continue
        if ids[r] in present:
            dup += 1
            if len(dup_ids) < 5:
                dup_ids.append(ids[r])
            continue
        shown = value
        if isinstance(value, dict):  # datasets.Image / Audio cell
            shown = value.get("path")
            value = value.get("path") or value
        elif not _scalar(value):  # a decoded PIL image: embed it, keep no value
            shown = getattr(value, "filename", None) or None
        meta = {"id": ids[r], "modality": modality, "value": shown, "label": None}
        for c, col in extra:
            meta[c] = col[r]
        metas.append(meta)
        inputs.append(value)
    if empty:
        log.info("build_index: skipped %d rows with an empty %r cell", empty, modality)
    if dup:
        log.warning("build_index: skipped %d row(s) whose id is already in the index (%s%s); not added again",
                    dup, ", ".join(dup_ids), ", ..." if dup > len(dup_ids) else "")
    if not inputs:
        if existing is not None and append:
            return index
        raise RetrievalError(f"no rows with a non-empty {modality!r} value to index")
    emb = model.encode(modality, inputs, batch_size=batch_size, progress=progress, **as_prefix)
    if hubness is not None:  # (Hubness, query bank): each row's penalty in its metadata, for Retriever(hubness=)
        import torch

        from .hubness import hub_penalty, with_penalties
        how, bank = hubness
        metas = with_penalties(metas, hub_penalty(bank, torch.as_tensor(emb), how))
        index.model_info = {**(index.model_info or {}), "hubness": {"method": how.method, "beta": how.beta,
                                                                     "k": how.k, "bank_rows": len(bank)}}
    new_ids = index.add(emb, metas)
    if tune is not None:
        if len(new_ids) != len(index):
            raise RetrievalError("tune: the index holds rows whose float vectors are not at hand; build it anew")
        from .tuning import tune as tune_index
        queries = model.encode(tune["modality"], tune["values"], batch_size=batch_size, progress=progress,
                               **as_prefix)
        tune_index(index, emb, queries, float(tune["target"]), ids=new_ids)
    index.save(out)
    return index


class Retriever:
    """Query an index with a model: ``Retriever("indexes/images").search("a red car", "text", k=5)``.

    ``model``: ``None`` (load the run folder recorded in ``index.json``), a run folder path (or an export's, or
    ``hf-hub:ORG/NAME``, as ``xmodal.load`` takes), or a model object.
    Whatever the source, the model's fingerprint (sha256 of its ``model.safetensors`` and its ``embed_dim``) must
    equal the one recorded when the index was built, else :class:`FingerprintMismatchError`. A path is checked and
    loaded lazily (on the first query or ``.model`` access); an object is checked at once.

    Queries may be any modality the model has a tower for (text → images, image → images, audio → images, ...).
    """

    def __init__(self, index_dir: str | os.PathLike | EmbeddingIndex | ShardedIndex, model: Any = None, *,
                 batch_size: int = 64):
        if isinstance(index_dir, (EmbeddingIndex, ShardedIndex)):
            self.index, self.index_dir = index_dir, None
        else:
            self.index_dir = Path(index_dir).absolute()
            self.index = open_index(self.index_dir)  # one index folder, or a sharded one (shards.json)
        self.batch_size = batch_size
        self._model = None
        self._run_dir: Path | None = None
        where = f"index {self.index_dir}" if self.index_dir else "the index"
        self._where = where
        info = self.index.model_info
        if model is None:
            if not info or not info.get("run_dir"):
                raise RetrievalError(f"{where} records no run folder for its model; pass the model (model= / --run)")
            self._run_dir = Path(info["run_dir"])
        elif isinstance(model, (str, os.PathLike)):  # a run folder, an export, hf-hub:ORG/NAME (as xmodal.load)
            from ..model_files import model_folder
            self._run_dir = model_folder(model).absolute()
        else:
            fp = model_fingerprint(model, self.modality or "", run_dir=None)
            if info and fp["sha256"] != info.get("sha256") and _same_weights_as_recorded_run(model, info):
                fp = {**fp, "sha256": info["sha256"]}  # loaded from the recorded file, which an older format wrote
            _check_fingerprint(info, fp, where)
            self._check_dim(fp["embed_dim"])
            self._model = model
        if not info:
            log.warning("%s records no model fingerprint; cannot check that the query model made it", where)

    @property
    def modality(self) -> str | None:
        """The modality of the indexed items."""
        return (self.index.model_info or {}).get("modality")

    def _check_dim(self, embed_dim: int) -> None:
        prefix = (self.index.model_info or {}).get("dim")  # an index of embedding prefixes (Matryoshka)
        if (prefix or embed_dim) != self.index.dim or (prefix or 0) > embed_dim:
            raise FingerprintMismatchError(f"{self._where} holds {self.index.dim}-d vectors but the model embeds into "
                                           f"{embed_dim} dimensions")

    @property
    def model(self):
        if self._model is None:
            from ..model import load

            self._model = load(self._checked_run())
        return self._model

    def _checked_run(self) -> Path:
        """The run folder, once its weights are checked to be the ones the index was built with."""
        run = self._run_dir
        if not getattr(self, "_run_checked", False):
            if not run.is_dir():
                raise FileNotFoundError(f"run folder {run} (recorded in {self._where}) does not exist; pass the "
                                        f"model's run folder (--run / model=), its export or hf-hub:ORG/NAME")
            fp = model_fingerprint(run, self.modality or "")
            _check_fingerprint(self.index.model_info, fp, self._where)
            self._check_dim(fp["embed_dim"])
            self._run_checked = True
        return run

    def _model_for(self, modality: str):
        """The model that embeds ``modality`` queries: the whole model when it was given or loaded, else one with
        only that tower (a text query then never builds the image tower, nor imports its libraries)."""
        if self._model is not None:
            return self._model
        partial = self.__dict__.setdefault("_partial", {})
        if modality not in partial:
            from ..model import CARD_NAME, load

            run = self._checked_run()
            try:
                towers = json.loads((run / CARD_NAME).read_text(encoding="utf-8"))["model"]["towers"]
            except (OSError, ValueError, KeyError, TypeError):
                return self.model  # an unreadable card: the full load reports it
            if modality not in towers:
                return self.model  # the caller names the towers there are
            partial[modality] = load(run, towers=[modality])
        return partial[modality]

    def search(self, query: Any, modality: str, k: int = 10, filter: Filter = None, hubness: bool = False,
               **search_opts: Any) -> list[Hit] | list[list[Hit]]:
        """Embed ``query`` (a string / path / PIL image, or a list of them for a batch) as ``modality`` and search.

        Returns a list of hits, or a list of lists for a list of queries. ``filter`` as in
        :meth:`EmbeddingIndex.search`. ``hubness``: rank by ``score − penalty`` (an index built with hubness
        penalties; the nearest :func:`~.hubness.candidates` items are re-scored).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        batch = isinstance(query, (list, tuple))
        items = [str(q) if isinstance(q, os.PathLike) else q for q in (query if batch else [query])]
        model = self._model_for(modality)
        mods = _model_modalities(model)
        if modality not in mods:
            raise RetrievalError(f"this model has no {modality!r} tower, so it cannot embed {modality} queries "
                                 f"(towers: {', '.join(mods)})")
        if modality in path_modalities():  # a query argument naming a file is read as that file
            for q in items:
                if isinstance(q, str) and not Path(q).expanduser().is_file():
                    raise FileNotFoundError(f"{modality} query file not found: {q}")
            items = [str(Path(q).expanduser()) if isinstance(q, str) else q for q in items]
        if not items:
            return []
        prefix = (self.index.model_info or {}).get("dim")
        emb = model.encode(modality, items, batch_size=self.batch_size, progress=False,
                           **({"dim": prefix} if prefix else {}))
        if hubness:
            from .hubness import candidates, rerank
            results = [rerank(hits, k) for hits in self.index.search(emb, candidates(k, len(self.index)), filter,
                                                                      **search_opts)]
        else:
            results = self.index.search(emb, k, filter, **search_opts)
        return results if batch else results[0]

    def search_embeddings(self, embeddings: Any, k: int = 10, filter: Filter = None,
                          **search_opts: Any) -> list[list[Hit]]:
        """Search with already-computed query embeddings ``[nq, dim]``."""
        return self.index.search(embeddings, k, filter, **search_opts)
