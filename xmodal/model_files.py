"""A model folder's two files — ``model.safetensors`` and its card ``model.json`` — saved as one unit and checked
before they are used.

**The card is the manifest, written last.** It records the size and XXH3-128 checksum of the weights it was saved with
(``"files"``) and its own checksum (``"checksum"``, see :mod:`xmodal.integrity`). Loading checks both before the
weights are read, so a truncated, bit-flipped, empty or foreign ``model.safetensors`` is refused in one line naming
the file, never loaded as something else and never a safetensors traceback. Cards written before checksums
existed carry neither field and load as before.

**Save** (``.model.safetensors.tmp``, ``.model.json.tmp`` and ``.model.safetensors.old`` are hidden siblings):

1. finish what an interrupted save left (as below), delete stale temporary files;
2. write the new weights into ``.model.safetensors.tmp`` and fsync it;
3. write the new card (recording step 2's file) into ``.model.json.tmp`` and fsync it;
4. keep the old weights as ``.model.safetensors.old`` (a hard link; a rename where links are not supported);
5. rename the new weights onto ``model.safetensors``;
6. rename the new card onto ``model.json`` — **the commit point**; fsync the folder;
7. delete ``.model.safetensors.old``.

**Load after a crash.** ``.model.safetensors.old`` *and* ``.model.json.tmp`` both present means the save stopped
between steps 4 and 6: ``model.json`` is still the old card, and ``.model.safetensors.old`` its weights, so that
pair is loaded (the previous model, complete). A crash at any other point leaves ``model.json`` with the weights it
describes. Loading never changes the folder; the next save tidies it (step 1). So no crash point pairs new weights
with the old card, which the two plain renames of earlier versions could.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from .atomic import fsync_dir, fsync_file
from .integrity import IntegrityError, check_file, file_record, read_sealed_json, seal

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "model.json"
REMEDY = "copy the model folder again from where it came (or train it again)"
EXPORT_SUBFOLDER = "xmodal"  # in a folder written by `xmodal export --format hf`: the whole xmodal model
HUB_PREFIX = "hf-hub:"


def model_folder(path: str | os.PathLike) -> Path:
    """The folder holding a model's two files: ``path`` itself (a run folder), its ``xmodal/`` subfolder (a folder
    written by ``xmodal export --format hf``), or that of an ``hf-hub:ORG/NAME`` repo (downloaded, or read from the
    local Hugging Face cache when offline). Whether the files are there is :func:`open_files`' to check."""
    text = str(path)
    folder = _hub_folder(text[len(HUB_PREFIX):]) if text.startswith(HUB_PREFIX) else Path(path)
    return folder / EXPORT_SUBFOLDER if (folder / EXPORT_SUBFOLDER / CARD_NAME).is_file() else folder


def _hub_folder(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds (offline, not found, auth)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"hf-hub:{repo}: cannot read the repo ({type(e).__name__}: {first})") from None


def _hidden(folder: Path) -> tuple[Path, Path, Path]:
    """``(new weights, new card, old weights)`` of a save in progress."""
    return (folder / f".{WEIGHTS_NAME}.tmp", folder / f".{CARD_NAME}.tmp", folder / f".{WEIGHTS_NAME}.old")


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _interrupted(folder: Path) -> bool:
    """A save stopped between keeping the old weights aside and committing the new card (steps 4-6)."""
    _, new_card, old_weights = _hidden(folder)
    return old_weights.is_file() and new_card.is_file()


def _tidy(folder: Path) -> None:
    """Step 1 of a save: an interrupted save is rolled back to the old pair, or (after its commit) finished."""
    new_weights, new_card, old_weights = _hidden(folder)
    if _interrupted(folder):
        log.warning("model %s: a save was interrupted before it completed; restoring the previous weights", folder)
        os.replace(old_weights, folder / WEIGHTS_NAME)
    _remove(new_weights, new_card, old_weights)


def save_files(folder: Path, write_weights: Callable[[Path], None], card: dict[str, Any]) -> Path:
    """Save a model folder as one unit (see the module's docstring). ``write_weights(path)`` writes the safetensors
    file. A failure (a full disk, a read-only folder) removes what this save wrote, leaves the previous model as it
    was and raises ``OSError`` saying so."""
    from safetensors import SafetensorError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _tidy(folder)
    new_weights, new_card, old_weights = _hidden(folder)
    weights, card_path = folder / WEIGHTS_NAME, folder / CARD_NAME
    try:
        write_weights(new_weights)
        fsync_file(new_weights)  # on disk before any rename: a power cut cannot leave the name on an empty file
        sealed = seal({**card, "files": {WEIGHTS_NAME: file_record(new_weights)}})
        with open(new_card, "w", encoding="utf-8") as f:
            f.write(json.dumps(sealed, indent=2))
        fsync_file(new_card)
        # safetensors creates its file owner-only (0600); give the weights the card's mode, i.e. the user's umask
        os.chmod(new_weights, os.stat(new_card).st_mode & 0o777)
        if weights.is_file():
            try:
                os.link(weights, old_weights)
            except OSError:  # no hard links here (some network / FAT file systems): move it aside instead
                os.replace(weights, old_weights)
            fsync_dir(folder)
        os.replace(new_weights, weights)
        os.replace(new_card, card_path)  # the commit point
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        if old_weights.is_file():
            os.replace(old_weights, weights)
        _remove(new_weights, new_card)
        message = f"saving the model to {folder} failed ({e}); the files already there are unchanged"
        raise (OSError(e.errno, message) if isinstance(e, OSError) else OSError(message)) from e
    fsync_dir(folder)
    _remove(old_weights)
    return folder


def open_files(folder: Path) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """``(weights file to read, card, the card's record of the weights)`` of a model folder. The card is checked
    against its own checksum, and the weights' size against the record, here (a file cut short costs no hashing);
    the weights' checksum is checked by :func:`read_weights`, which reads them. The record is None for a card
    written before checksums (nothing to check). After a save interrupted before its commit, the previous pair (see
    the module's docstring)."""
    folder = Path(folder)
    card_path, weights = folder / CARD_NAME, folder / WEIGHTS_NAME
    if _interrupted(folder):
        weights = _hidden(folder)[2]
        log.warning("model %s: a save was interrupted before it completed; loading the previous model (%s)",
                    folder, weights.name)
    if not card_path.is_file():
        if weights.is_file():
            raise FileNotFoundError(f"{card_path} is missing: {folder} is not an xmodal model folder without it "
                                    f"(needs {CARD_NAME} and {WEIGHTS_NAME}); {REMEDY}")
        if not folder.exists():
            raise FileNotFoundError(f"{folder}: not an xmodal model folder: no such file or folder")
        raise FileNotFoundError(f"{folder}: not an xmodal model folder (needs {CARD_NAME} and {WEIGHTS_NAME}, or an "
                                f"{EXPORT_SUBFOLDER}/ subfolder holding them: an export)")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (the model card {card_path} needs it); {REMEDY}")
    card = read_sealed_json(card_path, REMEDY)
    record = (card.get("files") or {}).get(WEIGHTS_NAME)
    if not isinstance(record, dict):  # a card written before checksums: nothing to check
        return weights, card, None
    if record.get("size") != weights.stat().st_size:  # cut short or empty: said at once, no hashing needed
        check_file(weights, record, recorded_in=card_path, remedy=REMEDY)
    return weights, card, record


def read_weights(weights: Path, card_path: Path, record: dict[str, Any] | None) -> Callable[[], dict[str, Any]]:
    """Start reading ``weights``: they are mapped now (a header safetensors cannot parse fails here), and their
    checksum against the card's ``record`` is computed in a thread while the caller builds the model. The returned
    function waits for it and gives the tensors (CPU tensors over safetensors' mapping of the file) only if they
    match; a mismatch is raised there. The checksum is computed from those very tensors (the header, then their
    bytes in file order: :func:`xmodal.integrity.mapped_safetensors_digest`), so the file is read once and the copy
    into the model reads pages the hash has just brought in; XXH3 releases the GIL, so the hash overlaps the
    model's construction (docs/benchmarks.md, "Verifying files on load"). A file safetensors cannot parse is first
    checked whole against the record (a damaged file is named as such), else reported as :func:`unreadable`."""
    import threading

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights), device="cpu")
    except SafetensorError as e:  # a header cut short or garbled
        if record is not None:
            check_file(weights, record, recorded_in=card_path, remedy=REMEDY)
        raise unreadable(weights, card_path, e) from None
    if record is None:
        return lambda: tensors
    failed: list[BaseException] = []

    def check() -> None:
        try:
            check_file(weights, record, recorded_in=card_path, remedy=REMEDY, tensors=tensors)
        except BaseException as e:  # noqa: BLE001 - raised in the caller, when it asks for the tensors
            failed.append(e)

    thread = threading.Thread(target=check, name="xmodal-weights-check", daemon=True)
    thread.start()

    def checked() -> dict[str, Any]:
        thread.join()
        if failed:
            raise failed[0]
        return tensors
    return checked


def load_into(model: Any, tensors: dict[str, Any], partial: bool = False) -> None:
    """Copy ``tensors`` into ``model``'s parameters and buffers. Whole (``partial=False``): every name of the model
    must be given once, as ``safetensors.torch.load_model(strict=True)`` asks (a name tied to another that is
    given, which ``save_model`` leaves out, counts as given); partial: only the model's own names are taken from
    ``tensors`` (a model built with some of the towers), and each of them must be there. ``RuntimeError`` (torch's
    own message) on keys or shapes of another model."""
    own = model.state_dict()
    if partial:
        model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=True)
        return
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    given = {own[k].untyped_storage().data_ptr() for k in tensors if k in own}
    missing = [k for k in missing if own[k].untyped_storage().data_ptr() not in given]
    if missing or unexpected:
        error = f"Error(s) in loading state_dict for {type(model).__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
        raise RuntimeError(error)


def unreadable(weights: Path, card_path: Path, error: Exception) -> IntegrityError:
    """One line for weights that passed the card's checks (or had none) but do not load into the card's model."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    detail = "; ".join(lines[:3]) or type(error).__name__
    return IntegrityError(f"{weights} does not load as the model {card_path} describes ({detail}): the file is "
                          f"damaged or not the one saved with this card; {REMEDY}")
