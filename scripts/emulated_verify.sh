#!/usr/bin/env bash
# Run erde-verify (--threads 1) on both bundled model folders on emulated 64-bit ARM (aarch64, qemu-user),
# with this checkout's runtime/ and aarch64 builds of onnxruntime, numpy and Pillow.
# Needs: Debian 12 (bookworm) x86-64 with qemu-aarch64 (apt-get install qemu-user), apt-get and dpkg, and
# python3 with pip (or $PYTHON, a Python that has pip). The first run needs Debian's apt repositories and PyPI:
# it fetches Debian's arm64 python3.11 and its libraries with a private apt state (nothing is installed on or
# changed in the host) and the aarch64 wheels, and keeps them in $ERDE_CACHE/emulated-aarch64 (default
# ~/.cache/erde); later runs use that copy offline. Prints one line per model folder and a final line;
# exits 1 with an "Error: ..." line if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=${PYTHON:-python3}
debs="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 zlib1g libexpat1
      libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1"
wheels="onnxruntime==1.21.1 numpy==2.4.6 Pillow==13.0.0 click==8.5.1"  # onnxruntime 1.32 does not start under qemu-user
cache=${ERDE_CACHE:-$HOME/.cache/erde}/emulated-aarch64
key=$(printf '%s\n' $debs $wheels | sha256sum | cut -c1-16)
env_dir=$cache/$key  # the arm64 sysroot and the aarch64 site-packages
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$cache/.build-$$"' EXIT
trap 'exit 130' INT TERM
fail() { echo "Error: $*" >&2; exit 1; }
last() {  # the last message in the text on stdin, with bash's "FILE: line N: PID Segmentation fault  COMMAND" shortened
  grep -v -e '^WARNING' -e '^ *$' | tail -1 | sed -E 's/^.*: line [0-9]+: +[0-9]+ ([A-Z][a-z]+( [a-z()]+)*) .*$/\1/'
}
step() {  # step WHAT COMMAND...: run quietly; on failure, say what failed and the command's last message
  local what=$1; shift
  "$@" > "$tmp/log" 2>&1 || fail "$what failed: $(last < "$tmp/log")"
}
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
guest() {  # guest ARGS...: run the arm64 python3.11 under qemu-aarch64
  env -u PYTHONHOME -u LD_PRELOAD -u LD_LIBRARY_PATH OPENBLAS_NUM_THREADS=1 PYTHONPATH="$tmp/pkg:$env_dir/site" \
    qemu-aarch64 -L "$env_dir/sysroot" "$env_dir/sysroot/usr/bin/python3.11" -s "$@"
}

command -v qemu-aarch64 > /dev/null || fail "qemu-aarch64 is not on PATH; install it: apt-get install qemu-user"
mkdir -p "$tmp/pkg/erde" && cp -r "$root/runtime" "$tmp/pkg/erde/runtime" && cp "$root/erde/__init__.py" "$tmp/pkg/erde/"  # as installed
t0=$(now)
if [ -d "$env_dir" ]; then
  setup="$(since "$t0") s (cached)"
else  # build in $cache/.build-PID and rename it into place, so a killed run never leaves a half-made copy
  for d in "$cache"/.build-*; do [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null && rm -rf "$d"; done
  env_dir=$cache/.build-$$
  "$py" -m pip --version > /dev/null 2>&1 || fail "$py has no pip: apt-get install python3-pip, or set PYTHON"
  mkdir -p "$tmp/apt/lists/partial" "$tmp/apt/cache/archives/partial" "$tmp/apt/parts" "$tmp/debs" "$env_dir/sysroot"
  # A private apt: arm64 only, its own lists and cache, no installed packages, none of the host's apt.conf.d.
  export APT_CONFIG=$tmp/apt/apt.conf
  echo "APT::Architecture \"arm64\"; APT::Architectures { \"arm64\"; }; APT::Sandbox::User \"root\";
    Dir::Etc::Parts \"$tmp/apt/parts\"; Dir::State::Status \"/dev/null\"; Dir::State::Lists \"$tmp/apt/lists\";
    Dir::Cache \"$tmp/apt/cache\";" > "$APT_CONFIG"
  step "apt-get update (arm64 package lists)" apt-get -q update
  (cd "$tmp/debs" && step "apt-get download (arm64 python3.11)" apt-get -q download $debs)
  for d in "$tmp"/debs/*.deb; do step "dpkg -x $(basename "$d")" dpkg -x "$d" "$env_dir/sysroot"; done
  step "pip install (aarch64 wheels: $wheels)" "$py" -m pip install -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64 \
    --target "$env_dir/site" $wheels
  echo "python3.11 $(dpkg-deb -f "$tmp"/debs/python3.11-minimal_*.deb Version), $wheels" > "$env_dir/versions"
  step "the emulated Python's first import of onnxruntime, numpy and PIL" \
    guest -c "import onnxruntime, numpy, PIL, click"
  find "$cache" -mindepth 1 -maxdepth 1 -name '[!.]*' ! -name "$key" -exec rm -rf {} +  # other versions' copies
  mv -T "$env_dir" "$cache/$key" 2> /dev/null || rm -rf "$env_dir"  # a concurrent run may have won: use its copy
  env_dir=$cache/$key
  setup="$(since "$t0") s (built)"
fi

failed=()
for m in cifar10 cifar10-int8; do
  t0=$(now)
  if out=$(ERDE_CACHE="$tmp/erde-cache" guest -m erde.runtime.tools.verify_cli --model "$root/runtime/models/$m" --threads 1 2>&1)
  then verdict=passed; else verdict=FAILED; failed+=("$m"); fi
  checks=$(grep -E '^  (✓|✗) ' <<< "$out" | sed -E 's/^  //; s/ \((at least|at most) [^)]*\)$//' | paste -sd ';' - |
           sed 's/;/; /g' || true)
  echo "$m: $verdict in $(since "$t0") s on emulated aarch64 (${checks:-$(last <<< "$out")})"
done
about="$(qemu-aarch64 --version | awk '{ print $1, $3; exit }'), $(cat "$env_dir/versions"); setup $setup"
[ ${#failed[@]} -eq 0 ] || fail "erde-verify failed on emulated aarch64 for ${failed[*]} ($about)"
echo "emulated aarch64: both model folders passed ($about)"
