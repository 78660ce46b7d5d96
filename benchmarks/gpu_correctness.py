#!/usr/bin/env python
"""Correctness at the target shape, on a row subset (stage 2 of ``scripts/gpu_check.sh``).

    python benchmarks/gpu_correctness.py --out DIR [--device cuda] [--dry]

* **encode**: every available backend's ``topk_encode`` on ``rows`` × the full n (default 512 × 131072,
  d = 4096, k = 64, bf16) against a float64 reference ``relu((x − b_dec) @ W_enc.T + b_enc)`` + top-k.
  Reported: the largest value error relative to the row's top value, and the fraction of selected indices
  that the reference also selects (ties at the k-th value allowed: an index whose reference pre-activation
  equals the k-th value to within the value tolerance counts as agreeing).
* **decode + backward**: ``sparse_decode`` forward and the gradients of a non-trivial loss w.r.t. values and
  W_dec, each backend against the ``torch`` backend at B = 2048, in the same dtype (and both against float64).

Inputs are random normal, never zero. Writes ``correctness.json`` and ``correctness.md`` into ``--out`` after
each check, so a stage killed half-way still leaves what it measured. ``--dry`` runs a small shape on the CPU
(the ``torch`` and ``cpu`` backends) so CI exercises the script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # the repo's dlmscope, also when it is not installed

import dlmscope  # noqa: E402
from dlmscope.backends import get_backend  # noqa: E402

TARGET = dict(rows=512, d=4096, n=131072, k=64, dtype="bf16", B_dec=2048)
DRY = dict(rows=64, d=64, n=1024, k=8, dtype="fp32", B_dec=256)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
#: pass thresholds: value error relative to the row's top value, index agreement, decode/grad relative error
VALUE_TOL = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
INDEX_MIN = 0.99


def _write(out: str, result: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "correctness.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# Correctness at the target shape ({result['device']}, {result['gpu']})", "",
             f"shape: {result['shape']}", "", "| check | backend | metric | value | pass |", "|---|---|---|---|---|"]
    for c in result["checks"]:
        for metric, value in c["metrics"].items():
            lines.append(f"| {c['check']} | {c['backend']} | {metric} | {value:.3g} | {'yes' if c['passed'] else 'NO'} |")
    with open(os.path.join(out, "correctness.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _inputs(s: dict, device, gen):
    d, n = s["d"], s["n"]
    x = torch.randn(s["rows"], d, generator=gen, device=device)
    W_enc = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device=device), dim=1)
    b_enc = 0.01 * torch.randn(n, generator=gen, device=device)
    b_dec = 0.1 * torch.randn(d, generator=gen, device=device)
    return x, W_enc, b_enc, b_dec


def check_encode(backend: str, s: dict, device, dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    x, W_enc, b_enc, b_dec = _inputs(s, device, gen)
    cast = [t.to(dtype) for t in (x, W_enc, b_enc, b_dec)]
    # the reference sees the same (rounded) inputs, computed in float64
    pre = torch.relu((cast[0].double() - cast[3].double()) @ cast[1].double().T + cast[2].double())
    ref_v, ref_i = pre.topk(s["k"], dim=-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    values, indices = dlmscope.topk_encode(*cast, s["k"], backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    got = values.double().sort(-1, descending=True).values
    scale = ref_v[:, :1].clamp_min(1e-12)
    value_err = float(((got - ref_v).abs() / scale).max())
    kth = ref_v[:, -1:]
    chosen_pre = pre.gather(1, indices)
    tol = VALUE_TOL[s["dtype"]] * scale
    agree = (torch.isin(indices, ref_i) | ((chosen_pre - kth).abs() <= tol)).double().mean()
    return {"check": "encode", "backend": backend, "seconds": wall,
            "metrics": {"max_rel_value_error": value_err, "index_agreement": float(agree)},
            "passed": value_err <= VALUE_TOL[s["dtype"]] and float(agree) >= INDEX_MIN}


def check_decode(backend: str, s: dict, device, dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    B, k, n, d = s["B_dec"], s["k"], s["n"], s["d"]
    values = torch.rand(B, k, generator=gen, device=device) + 0.1
    indices = torch.stack([torch.randperm(n, generator=gen, device=device)[:k] for _ in range(B)])
    W_dec = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device=device), dim=1)
    b_dec = 0.1 * torch.randn(d, generator=gen, device=device)
    target = torch.randn(B, d, generator=gen, device=device)

    def run(name, dt):
        v = values.to(dt, copy=True).requires_grad_()         # fresh leaves: no gradient carried between runs
        W = W_dec.to(dt, copy=True).requires_grad_()
        out = dlmscope.sparse_decode(v, indices, W, b_dec.to(dt), backend=name)
        loss = ((out.double() - target.double()) ** 2).sum()
        loss.backward()
        return out.detach().double(), v.grad.double(), W.grad.double()

    ref = run("torch", torch.float64) if device.type == "cpu" or backend == "torch" else None
    mine, base = run(backend, dtype), run("torch", dtype)
    metrics = {}
    for name, a, b in zip(("out", "grad_values", "grad_W_dec"), mine, base):
        metrics[f"{name}_rel_error_vs_torch"] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    if ref is not None:
        metrics["out_rel_error_vs_fp64"] = float((mine[0] - ref[0]).norm() / ref[0].norm())
    tol = 10 * VALUE_TOL[s["dtype"]]
    return {"check": "decode+backward", "backend": backend, "metrics": metrics,
            "passed": all(v <= tol for v in metrics.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dry", action="store_true", help="a small shape on the CPU")
    a = ap.parse_args(argv)
    s = DRY if a.dry else TARGET
    device = torch.device(a.device or ("cpu" if a.dry else "cuda"))
    dtype = DTYPES[s["dtype"]]
    backends = [b for b in dlmscope.available_backends()
                if get_backend(b).supports(device) and not (a.dry and b == "triton")]
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none",
              "torch": torch.__version__, "shape": s, "backends": backends, "checks": []}
    _write(a.out, result)
    for check in (check_encode, check_decode):
        for b in backends:
            try:
                result["checks"].append(check(b, s, device, dtype))
            except Exception as exc:                         # a failing backend is a result, not the end
                result["checks"].append({"check": check.__name__, "backend": b, "metrics": {},
                                         "passed": False, "error": f"{type(exc).__name__}: {exc}"})
            _write(a.out, result)
            print(json.dumps(result["checks"][-1]), flush=True)
    failed = [c for c in result["checks"] if not c["passed"]]
    print(f"correctness: {len(result['checks']) - len(failed)} of {len(result['checks'])} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
