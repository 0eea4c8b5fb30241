#!/usr/bin/env bash
# Check that `pip install 'erde[runtime]'` can find binary wheels for 64-bit ARM Linux
# (Raspberry Pi OS 64-bit, Jetson) on every Python version the package supports.
# Resolves onnxruntime, numpy and Pillow with all their dependencies, wheels only, for
# manylinux aarch64, without installing anything. Needs network access to PyPI.
set -u
cd "$(dirname "$0")/.."
spec=$(python3 -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']['runtime']))")
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
status=0
for py in 3.9 3.10 3.11 3.12 3.13; do
  if out=$(python3 -m pip download -q --only-binary=:all: --implementation cp --python-version "$py" \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64 \
      --platform manylinux_2_28_aarch64 -d "$dest/$py" $spec 2>&1); then
    echo "Python $py aarch64: ok ($(cd "$dest/$py" && ls | grep -E '^(onnxruntime|numpy|pillow)-' -i | sed 's/-cp.*//;s/-py.*//' | tr '\n' ' '))"
  else
    echo "Python $py aarch64: FAILED: $(echo "$out" | grep -v WARNING | tail -1)"
    status=1
  fi
done
exit $status
