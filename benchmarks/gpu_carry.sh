#!/usr/bin/env bash
# Rebuild .gpu/, the folder carried to a lent GPU machine for benchmarks/gpu_worker.py (and benchmarks/gpu.py).
#
# The device has Python 3.12 with torch, transformers 5.x, tokenizers, onnxruntime (CPU), prometheus-client,
# psutil, numpy, pyyaml and pynvml, but no Kafka, no JVM and no network. What it lacks travels here:
#   .gpu/model/   the fine-tuned model, weights stored as fp16 (the 87 MB fp32 file does not fit the 64 MiB
#                 transfer); each engine loads them at its own precision. No onnx/ folder: the device has the
#                 CPU build of ONNX Runtime, so engine=auto on cuda rejects the ONNX candidates and runs PyTorch.
#   .gpu/dev.tsv  the GoEmotions dev split (texts of the run), with labels.txt.
#   .gpu/whl/     Python 3.12 manylinux wheels, pinned by constraints.txt, of every third-party distribution
#                 the script imports that the device lacks or has at another version (transformers 4.57 and
#                 its hub and tokenizers, as this project pins them, and requests, which transformers 4.57
#                 checks for at import); `gpu_worker.py --check-imports` lists what the processes import.
#                 The transformers wheel is cut to the model families the worker loads (auto, bert) and those
#                 AutoTokenizer imports on its way to BERT's tokenizer (KEEP_MODELS): the other ~380 families
#                 are 9 MiB the transfer cannot spare; the rest of the wheel is unchanged (its RECORD lists what
#                 remains). safetensors is the device's own (transformers 5 needs it too).
#   .gpu/.gitignore  "*": the folder ignores itself in any checkout (git reads info/exclude from the common
#                 git dir, shared by every worktree). Name it in the device run's carry: [".gpu"].
#
# Usage, from the repository root: bash benchmarks/gpu_carry.sh   (PYTHON=... to use another interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-.venv/bin/python}"
OUT_DIR="$ROOT/.gpu"
# distributions carried as wheels (pinned versions come from constraints.txt)
WHEELS=(
  click orjson
  pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv
  transformers tokenizers huggingface_hub
  requests urllib3 idna certifi charset-normalizer
)
# transformers' model families kept in its wheel: what the worker loads (Auto* classes, BERT) and what AutoTokenizer
# imports on its way to BERT's tokenizer (encoder_decoder; align and bark list BertTokenizer before bert)
KEEP_MODELS="${KEEP_MODELS:-auto bert encoder_decoder align bark}"

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR/model" "$OUT_DIR/whl"
printf '*\n' >"$OUT_DIR/.gitignore"

# --- model: the one the settings find (EMOTION_STREAM_MODEL__PATH, else the built one), weights as fp16
MODEL="$("$PY" -c 'from stream_app.service import resolve_model_path; from stream_app.settings import load_settings; print(resolve_model_path(load_settings()))')"
echo "model: $MODEL"
for name in config.json model_card.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  if [[ -f "$MODEL/$name" ]]; then cp "$MODEL/$name" "$OUT_DIR/model/"; fi
done
"$PY" - "$MODEL/model.safetensors" "$OUT_DIR/model/model.safetensors" <<'EOF'
import sys

import torch
from safetensors.torch import load_file, save_file

tensors = load_file(sys.argv[1])
half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
save_file(half, sys.argv[2], metadata={"format": "pt"})
EOF

# --- texts
DATA="$("$PY" -c 'from stream_app.settings import load_settings; print(load_settings().data.goemotions_dir)')"
cp "$DATA/dev.tsv" "$OUT_DIR/dev.tsv"
if [[ -f "$DATA/labels.txt" ]]; then cp "$DATA/labels.txt" "$OUT_DIR/labels.txt"; fi

# --- wheels, pinned by constraints.txt
pins=()
for dist in "${WHEELS[@]}"; do
  pattern="$(printf '%s' "$dist" | sed 's/[-_.]/[-_.]/g')"
  pin="$(grep -iE "^${pattern}==" constraints.txt || true)"
  if [[ -z "$pin" ]]; then
    echo "no pin for $dist in constraints.txt" >&2
    exit 1
  fi
  pins+=("$pin")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT_DIR/whl" "${pins[@]}"

# --- cut the transformers wheel to the model families in KEEP_MODELS
# shellcheck disable=SC2086
"$PY" - "$OUT_DIR"/whl/transformers-*.whl $KEEP_MODELS <<'EOF'
import os
import sys
import zipfile

wheel, keep = sys.argv[1], set(sys.argv[2:])


def kept(name: str) -> bool:
    parts = name.split("/")
    return not (len(parts) > 3 and parts[0] == "transformers" and parts[1] == "models" and parts[2] not in keep)


tmp = wheel + ".tmp"
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if not kept(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if kept(line.split(",", 1)[0])).encode()
        dst.writestr(info, data)
os.replace(tmp, wheel)
EOF

du -sh "$OUT_DIR"/*
du -sh "$OUT_DIR"

du -sb "$OUT_DIR" | awk '{ if ($1 > 55 * 1024 * 1024) { print "WARNING: .gpu is over 55 MiB" > "/dev/stderr" } }'
