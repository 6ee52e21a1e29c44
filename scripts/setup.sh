#!/usr/bin/env bash
# Set up emotion-stream on a fresh machine (idempotent; a second run takes seconds):
#   1. a virtualenv with the pinned dependencies, kept in the cache (outside the repo) and linked as .venv
#   2. the Apache Kafka jars, resolved once from Maven Central into the cache
#   3. the default emotion model, fine-tuned once from the GoEmotions data (about 11 minutes on 2 cores),
#      and its ONNX (fp32 + INT8) export
# Environment: EMOTION_STREAM_CACHE_DIR (default ~/.cache/emotion-stream), PYTHON (default python3.11),
# EMOTION_STREAM_SKIP_MODEL=1 to skip step 3 (e.g. when EMOTION_STREAM_MODEL__PATH points elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${EMOTION_STREAM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/emotion-stream}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
mkdir -p "$CACHE"

# the venv is keyed by everything that decides its content
key=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-12)
VENV="$CACHE/venv-$key"   # the dependencies only, shared by every checkout with the same pins
if [ ! -f "$VENV/.complete" ]; then
  echo "==> creating $VENV (PyTorch and friends: a few GB, once)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade "pip>=24"
  "$VENV/bin/pip" install -q -c constraints.txt -e ".[dev]"
  "$VENV/bin/pip" uninstall -q -y emotion-stream   # keep the deps; each checkout installs itself below
  touch "$VENV/.complete"
fi
# .venv is this checkout's own small venv layered over the shared one (a .pth adds the shared
# site-packages), with this checkout installed editable: two clones never repoint each other's code.
SITE="lib/python3.11/site-packages"
if [ -L .venv ] || [ ! -f .venv/.base ] || [ "$(cat .venv/.base)" != "$VENV" ]; then
  rm -rf .venv
  "$PY" -m venv --without-pip .venv
  echo "import site; site.addsitedir('$VENV/$SITE')" >".venv/$SITE/zz_emotion_stream_deps.pth"
  echo "$VENV" >.venv/.base
fi
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null

echo "==> Apache Kafka jars"
.venv/bin/python -c 'from stream_app.devtools.kafka_local import ensure_kafka_libs; from stream_app.settings import load_settings; print(ensure_kafka_libs(load_settings().data.cache_dir))'

if [ "${EMOTION_STREAM_SKIP_MODEL:-0}" != "1" ]; then
  echo "==> emotion model (built once; later runs reuse the cache)"
  .venv/bin/emotion-stream model build --no-progress
  .venv/bin/emotion-stream model export --no-progress
fi
echo "==> ready: .venv -> $VENV"
