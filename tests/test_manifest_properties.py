"""Property tests of read_manifest: whatever a manifest file holds, the only exception is ManifestError; and valid
manifests, whatever their text, come back exactly (ids, texts, labels, split filter, max_rows).

Reproduce: ``pytest tests/test_manifest_properties.py`` (hypothesis prints the failing example and its seed)."""
from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xmodal.data import ManifestError, read_manifest

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

COLUMNS = ["id", "text", "image", "audio", "label", "split", "extra", " text ", "", "id"]  # incl. blank, duplicate
# unicode (no surrogates: they cannot be in a UTF-8 file) plus the characters CSV parsers trip on
CELL_TEXT = st.text(st.characters(exclude_categories=("Cs",)) | st.sampled_from(list(',"\n\r\t;\\\x00\ufeff ')),
                    max_size=12)
JSON_SCALAR = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | CELL_TEXT
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.sampled_from(COLUMNS) | CELL_TEXT, inner, max_size=3), max_leaves=6)


def _read_kwargs():
    return st.fixed_dictionaries({
        "split": st.none() | st.sampled_from(["train", "test", ""]),
        "modalities": st.none() | st.lists(st.sampled_from(["text", "image", "audio"]), min_size=1, max_size=2),
        "on_bad_row": st.sampled_from(["error", "skip"]),
        "max_rows": st.none() | st.integers(1, 5),
        "require_all": st.booleans(),
        "check_files": st.booleans(),
    })


def _only_manifest_errors(path: Path, kwargs: dict) -> None:
    try:
        m = read_manifest(path, **kwargs)
    except ManifestError:
        return
    assert len(m) > 0 and m.dataset.features["id"].dtype == "string"


def _folder():
    return tempfile.TemporaryDirectory(prefix="xmodal-prop-")


# ------------------------------------------------------------------------------------------------ arbitrary input

@SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]),
       kwargs=_read_kwargs())
def test_arbitrary_bytes_raise_only_manifest_error(data, suffix, kwargs):
    with _folder() as d:
        p = Path(d) / f"m{suffix}"
        p.write_bytes(data)
        _only_manifest_errors(p, kwargs)


@SETTINGS
@given(header=st.lists(st.sampled_from(COLUMNS) | CELL_TEXT, min_size=1, max_size=5),
       rows=st.lists(st.lists(CELL_TEXT | st.sampled_from(["1", "1", "a.png", "../x", "/etc/passwd"]), max_size=6),
                     max_size=6),
       sep=st.sampled_from([",", "\t"]), quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
       kwargs=_read_kwargs())
def test_arbitrary_csv_tables_raise_only_manifest_error(header, rows, sep, quoting, kwargs):
    with _folder() as d:
        p = Path(d) / ("m.csv" if sep == "," else "m.tsv")
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=sep, quoting=quoting)
            w.writerow(header)
            w.writerows(rows)  # ragged rows: fewer or more cells than the header
        (Path(d) / "a.png").write_bytes(b"not an image")
        _only_manifest_errors(p, kwargs)


@SETTINGS
@given(records=st.lists(st.dictionaries(st.sampled_from(COLUMNS) | CELL_TEXT, JSON_VALUE, max_size=5)
                        | JSON_VALUE, max_size=6),
       as_array=st.booleans(), kwargs=_read_kwargs())
def test_arbitrary_json_records_raise_only_manifest_error(records, as_array, kwargs):
    with _folder() as d:
        p = Path(d) / ("m.json" if as_array else "m.jsonl")
        text = json.dumps(records) if as_array else "".join(json.dumps(r) + "\n" for r in records)
        p.write_text(text, encoding="utf-8")
        _only_manifest_errors(p, kwargs)


@SETTINGS
@given(text=st.text(max_size=200), suffix=st.sampled_from([".csv", ".jsonl"]), kwargs=_read_kwargs())
def test_arbitrary_text_with_escaped_surrogates_raises_only_manifest_error(text, suffix, kwargs):
    # JSON can spell a lone surrogate ("\ud800"): valid JSON, but not a string Arrow (or UTF-8) can hold
    with _folder() as d:
        p = Path(d) / f"m{suffix}"
        line = json.dumps({"id": text, "text": text + "\ud800"}) if suffix == ".jsonl" else text
        p.write_text(line + "\n", encoding="utf-8", errors="surrogatepass")
        _only_manifest_errors(p, kwargs)


# -------------------------------------------------------------------------------------------------- round trip

VALID_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=15).filter(
    lambda s: s.strip() != "")  # a blank text is a bad row by design
ROW = st.fixed_dictionaries({"id": VALID_TEXT, "text": VALID_TEXT,
                            "label": st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
                            "split": st.sampled_from(["train", "test", "val"])})


@SETTINGS
@given(rows=st.lists(ROW, min_size=1, max_size=8, unique_by=lambda r: r["id"]),
       fmt=st.sampled_from(["csv", "tsv", "jsonl", "json"]), split=st.none() | st.sampled_from(["train", "test"]),
       max_rows=st.none() | st.integers(1, 4))
def test_valid_manifests_round_trip_exactly(rows, fmt, split, max_rows):
    expected = [r for r in rows if split is None or r["split"] == split][:max_rows]
    with _folder() as d:
        p = Path(d) / f"m.{fmt}"
        if fmt in ("csv", "tsv"):
            with open(p, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
                w.writeheader()
                w.writerows(rows)
        elif fmt == "jsonl":
            p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        else:
            p.write_text(json.dumps(rows), encoding="utf-8")
        if not expected:
            with pytest.raises(ManifestError, match=f"no rows with split {split!r}"):
                read_manifest(p, split=split, max_rows=max_rows)
            return
        m = read_manifest(p, split=split, max_rows=max_rows)
    assert m.skipped == 0 and m.modalities == ["text"]
    for key in ("id", "text", "label", "split"):
        assert m.dataset[key] == [r[key] for r in expected], key


@SETTINGS
@given(ids=st.lists(st.sampled_from(["a", "b", "007", "7"]), min_size=2, max_size=8))
def test_duplicate_ids_are_exactly_the_later_rows(ids):
    with _folder() as d:
        p = Path(d) / "m.csv"
        p.write_text("id,text\n" + "".join(f"{i},caption {n}\n" for n, i in enumerate(ids)), encoding="utf-8")
        first = {}
        for n, i in enumerate(ids):
            first.setdefault(i, n)
        keep = [n for n, i in enumerate(ids) if first[i] == n]
        m = read_manifest(p, on_bad_row="skip")
    assert m.dataset["text"] == [f"caption {n}" for n in keep]
    assert m.skipped == len(ids) - len(keep)
    assert all("field 'id': duplicate id" in msg for msg in m.problems)
