#!/usr/bin/env bash
# wheel_check.sh — `make wheel`, then install the wheel into a fresh venv that has only torch, and smoke-test it
# on the CPU from outside the checkout (so the installed package, not the source tree, is what runs): the core
# (ops, SAE, trainer) first, then the `dlm` extra (models, the CLI).
#   bash scripts/wheel_check.sh          (.ci/run runs it after the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
rm -rf dist
make -s wheel
WHEEL=$(ls "$ROOT"/dist/dlmscope-*.whl)
if [ -f dlmscope/libdlmscope_cuda.so ]; then   # built by `make cuda` (CI builds it first): it ships in the wheel
  # read the listing in Python: `zipfile -l | grep -q` under pipefail fails whenever grep exits first (SIGPIPE)
  python3 -c 'import sys, zipfile; sys.exit("dlmscope/libdlmscope_cuda.so" not in zipfile.ZipFile(sys.argv[1]).namelist())' "$WHEEL" \
    || { echo "wheel_check: libdlmscope_cuda.so is missing from $WHEEL" >&2; exit 1; }
fi
VENV=$(mktemp -d /tmp/dlmscope-wheel.XXXXXX)
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_PIN"
"$VENV/bin/python" -m pip install -q "$WHEEL"
cd "$VENV"
ROOT="$ROOT" "$VENV/bin/python" - <<'PY'
import os, torch, dlmscope
from dlmscope.sae.topk import TopKSAE
assert "cpu" in dlmscope.available_backends(), dlmscope.available_backends()   # the C++ extension came along
assert not dlmscope.__file__.startswith(os.environ["ROOT"]), dlmscope.__file__  # the wheel, not the checkout
x = torch.randn(256, 32)
sae = TopKSAE(32, 128, 8)
values, indices = sae.encode(x)
ref_v, _ = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).topk(8)
torch.testing.assert_close(values.sort(-1).values, ref_v.sort(-1).values)
loss = (sae(x) - x).pow(2).sum()
loss.backward()
assert sae.W_dec.grad is not None and torch.isfinite(sae.W_dec.grad).all()
from dlmscope.train.trainer import TrainConfig, Trainer                       # the trainer needs only the core
Trainer([TopKSAE(32, 128, 8)], TrainConfig(total_tokens=2048, warmup_steps=1)).fit(torch.randn(8, 256, 32))
from dlmscope.backends import cuda_lib
if cuda_lib.library_path().exists():                                           # shipped: every symbol resolves
    cuda_lib.load()
import importlib.util
assert importlib.util.find_spec("transformers") is None, "the core install pulled in the dlm extra"
assets = os.path.join(os.path.dirname(dlmscope.__file__), "world", "assets")
assert not os.path.exists(assets), "the world's assets belong to a clone, not the wheel"
print("core wheel ok:", dlmscope.__file__, dlmscope.available_backends())
PY
# the DLM side and the CLI with the `dlm` extra
"$VENV/bin/python" -m pip install -q "$WHEEL[dlm]"
"$VENV/bin/python" - <<'PY'
import dlmscope.cli, dlmscope.models, dlmscope.analysis.transfer, dlmscope.world
try:
    dlmscope.world.asset("models", "dlm")
except FileNotFoundError as e:                                                 # the clear error, not a crash
    assert "ship with a clone" in str(e), e
else:
    raise AssertionError("the wheel holds the world's models")
print("dlm extra ok")
PY
rm -rf "$VENV"
