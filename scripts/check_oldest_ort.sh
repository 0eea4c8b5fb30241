#!/usr/bin/env bash
# Check that the bundled model runs on the oldest onnxruntime the runtime declares (1.19.2, the last
# release for Python 3.9, still common on boards) and answers like the onnxruntime installed here.
# Usage: scripts/check_oldest_ort.sh IMAGE_FOLDER [MODEL_DIR]   (e.g. ../shared/datasets/cifar10/test/ship)
# MODEL_DIR (default: the bundled model) may be any model folder, e.g. an int8 one from erde-quantize.
# Builds a throw-away venv with onnxruntime==1.19.2 (from the package index) and this checkout
# (runtime extra only, no torch), runs erde-run --json over the folder with both versions and
# compares the class and exit of every image and the largest confidence difference.
set -eu
images=$(realpath "${1:?usage: $0 IMAGE_FOLDER [MODEL_DIR]}")
model=()
if [ -n "${2:-}" ]; then model=(--model "$(realpath "$2")"); fi
cd "$(dirname "$0")/.."
here=$(command -v erde-run) || { echo "Error: erde-run is not on PATH; activate the venv that has erde installed" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "onnxruntime==1.19.2" numpy Pillow click 2>&1 | grep -v WARNING || true
"$tmp/venv/bin/pip" install -q --no-deps . 2>&1 | grep -v WARNING || true
"$tmp/venv/bin/python" -c "import onnxruntime; print('old:', onnxruntime.__version__)"
"$here" "${model[@]}" --early-exit --folder "$images" --json > "$tmp/new.jsonl"  # the same path in both
(cd "$tmp" && "$tmp/venv/bin/erde-run" "${model[@]}" --early-exit --folder "$images" --json > "$tmp/old.jsonl")  # not this checkout's files
python3 - "$tmp/old.jsonl" "$tmp/new.jsonl" <<'PY'
import json, sys
old, new = ([r for r in map(json.loads, open(f)) if "image" in r] for f in sys.argv[1:])  # not the summary line
same = sum((a["image"], a["class_index"], a["exit_index"]) == (b["image"], b["class_index"], b["exit_index"])
           for a, b in zip(old, new))
diff = max(abs(a["confidence"] - b["confidence"]) for a, b in zip(old, new))
print(f"{same}/{len(new)} images: same class and exit with onnxruntime 1.19.2 as here; "
      f"largest confidence difference {diff:.1e}; threshold {new[0]['threshold']} ({new[0]['criterion']})")
sys.exit(0 if same == len(new) == len(old) else 1)
PY
