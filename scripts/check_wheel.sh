#!/usr/bin/env bash
# Build a robustops wheel, install it into a fresh venv (torch from the local wheel, no network),
# import it and run an op there. Usage: check_wheel.sh <python-with-torch> <torch-version>
set -euo pipefail
PY=${1:-.venv/bin/python}
TORCH_VERSION=${2:-2.13.0}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$root/wheelhouse" "$root"
wheel=$(ls -t "$root"/wheelhouse/robustops-*.whl | head -n 1)
echo "built $wheel"

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==$TORCH_VERSION" numpy scipy scikit-learn
"$work/venv/bin/pip" install -q --no-deps "$wheel"
cd "$work"  # not the source tree, so the installed wheel is what gets imported
"$work/venv/bin/python" - <<'PY'
import torch, robustops
info = robustops.build_info()
print("build_info:", info)
x, g = torch.rand(2, 3), torch.randn(2, 3)
out = robustops.ops.fgsm_step(x, g, [0.1, 0.2])
ref = torch.stack([torch.clamp(x + e * g.sign(), 0, 1) for e in (0.1, 0.2)])
assert torch.equal(out, ref), "fgsm_step from the wheel disagrees with the reference"
assert robustops.__file__.startswith("$work") or "site-packages" in robustops.__file__, robustops.__file__
print("wheel OK:", robustops.__file__)
PY
