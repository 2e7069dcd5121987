#!/usr/bin/env bash
# flash-attn 4 for a GPU machine without network: its wheels travel with the working tree,
# in two runs, because one wheel (nvidia-cutlass-dsl-libs-cu13, about 92 MB) is larger than
# what one run may carry (64 MiB).
#
# Here, with network:
#   tools/gpu/fa4_wheels.sh download DIR        the wheels (Python 3.12, manylinux x86_64), into DIR
#   tools/gpu/fa4_wheels.sh pack DIR CARRY      CARRY/part1 and CARRY/part2: the large wheel split in
#                                               two (split -b 50M), each part under 60 MiB, plus a
#                                               manifest (sha256 of every whole wheel) in each
# There, in two consecutive runs (the machine stays up only about 30 s after a run: send the
# second at once; the first part waits in /tmp/fa4-wheels, which a fresh machine does not have):
#   run 1: tools/gpu/fa4_wheels.sh receive CARRY/part1      keeps it, says what is still missing
#   run 2: tools/gpu/fa4_wheels.sh receive CARRY/part2      joins, checks, installs, imports
# receive installs with `python3 -m pip install --no-index --no-deps` into the machine's Python
# (not --target: that does not merge the packages' shared nvidia_cutlass_dsl folder and skips its
# .pth file, so `cutlass` is not found). Exit status 0 once flash_attn.cute imports; 3 while parts
# are missing.
set -euo pipefail
WHEELS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi torch-c-dlpack-ext
  quack-kernels einops cuda-bindings cuda-pathfinder protobuf)
STORE=${FA4_WHEELS_STORE:-/tmp/fa4-wheels}
PART_MAX=$((60 * 1024 * 1024))

case "${1:-}" in
download)
  dir=${2:?usage: download DIR}
  mkdir -p "$dir"
  platforms=()
  for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$tag"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "${WHEELS[@]}"
  ls -l "$dir"
  ;;
pack)
  dir=${2:?usage: pack DIR CARRY}
  carry=${3:?usage: pack DIR CARRY}
  rm -rf "$carry/part1" "$carry/part2"
  mkdir -p "$carry/part1" "$carry/part2"
  (cd "$dir" && sha256sum ./*.whl | sed 's# \./# #') >"$carry/part1/MANIFEST"
  cp "$carry/part1/MANIFEST" "$carry/part2/MANIFEST"
  used1=0
  used2=0
  # the large wheels first, split in two; then the small ones where there is room
  for wheel in $(ls -S "$dir"/*.whl); do
    name=$(basename "$wheel")
    size=$(stat -c %s "$wheel")
    if [ "$size" -gt $((40 * 1024 * 1024)) ]; then
      split -b 50M -d "$wheel" "$carry/part1/$name.piece-"
      mv "$carry/part1/$name.piece-01" "$carry/part2/"
      [ -e "$carry/part1/$name.piece-02" ] && { echo "$name: more than two pieces" >&2; exit 1; }
      used1=$((used1 + 50 * 1024 * 1024))
      used2=$((used2 + size - 50 * 1024 * 1024))
    elif [ $((used1 + size)) -le $PART_MAX ] && [ $used1 -le $used2 ]; then
      cp "$wheel" "$carry/part1/" && used1=$((used1 + size))
    elif [ $((used2 + size)) -le $PART_MAX ]; then
      cp "$wheel" "$carry/part2/" && used2=$((used2 + size))
    else
      cp "$wheel" "$carry/part1/" && used1=$((used1 + size))
    fi
  done
  du -sh "$carry/part1" "$carry/part2"
  ;;
receive)
  part=${2:?usage: receive PART_DIR}
  mkdir -p "$STORE"
  cp "$part"/* "$STORE"/
  cd "$STORE"
  missing=0
  while read -r sum name; do
    if [ ! -e "$name" ]; then
      pieces=("$name".piece-*)
      if [ ${#pieces[@]} -eq 2 ] && [ -e "${pieces[0]}" ]; then
        cat "${pieces[@]}" >"$name.joining" && mv "$name.joining" "$name"
      fi
    fi
    if [ ! -e "$name" ]; then
      echo "fa4 wheels: still missing $name"
      missing=1
    elif ! echo "$sum  $name" | sha256sum -c --status; then
      echo "fa4 wheels: $name is corrupt (sha256 differs)" >&2
      exit 1
    fi
  done <MANIFEST
  [ $missing -eq 1 ] && exit 3
  python3 -m pip install -q --no-index --no-deps --no-cache-dir $(cut -d' ' -f3 MANIFEST)
  python3 -c "import flash_attn.cute.interface, cutlass; print('flash_attn.cute imports; cutlass', cutlass.__version__)"
  ;;
*)
  sed -n '2,22p' "$0"
  exit 2
  ;;
esac
