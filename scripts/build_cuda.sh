#!/usr/bin/env bash
# build_cuda.sh — compile csrc/cuda/*.cu with nvcc into dlmscope/libdlmscope_cuda.so (the `cuda` backend loads it
# with ctypes; cudart is linked statically, so the library needs only the driver) for sm_80 and sm_90 (+ PTX),
# and write the ptxas register / spill report per kernel to benchmarks/results/cuda-compile.md.
#   bash scripts/build_cuda.sh           (make cuda; .ci/run runs it wherever nvcc exists: a compile break fails CI)
#   CUDA_ARCHS="90" bash scripts/build_cuda.sh        only sm_90
# Exit 1 on a compile error. Nothing here needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${CUDA_ARCHS:-80 90}
OUT_LIB=${CUDA_LIB_OUT:-dlmscope/libdlmscope_cuda.so}
REPORT=${CUDA_REPORT:-benchmarks/results/cuda-compile.md}
command -v "$NVCC" >/dev/null || { echo "build_cuda.sh: no nvcc on PATH" >&2; exit 1; }
FLAGS=(-O3 -std=c++17 -Xcompiler -fPIC --expt-relaxed-constexpr)
GENCODE=()
for a in $ARCHS; do GENCODE+=(-gencode "arch=compute_$a,code=sm_$a"); done
last=${ARCHS##* }
GENCODE+=(-gencode "arch=compute_$last,code=compute_$last")   # PTX of the newest arch: JIT-able on later cards
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
objs=()
for src in csrc/cuda/*.cu; do
  obj="$TMP/$(basename "$src" .cu).o"
  "$NVCC" "${FLAGS[@]}" "${GENCODE[@]}" -Xptxas -v -c "$src" -o "$obj" 2>"$TMP/$(basename "$src").ptxas" \
    || { cat "$TMP/$(basename "$src").ptxas" >&2; echo "build_cuda.sh: $src failed to compile" >&2; exit 1; }
  objs+=("$obj")
done
"$NVCC" -shared -cudart static "${GENCODE[@]}" "${objs[@]}" -o "$OUT_LIB"
echo "built $OUT_LIB ($(du -k "$OUT_LIB" | cut -f1) KB) for sm_${ARCHS// /, sm_}"

# the report: one row per (kernel instantiation, arch) from ptxas -v
python3 - "$TMP" "$REPORT" "$("$NVCC" --version | tail -n 2 | head -n 1)" <<'PY'
import glob, os, re, subprocess, sys
tmp, report, nvcc = sys.argv[1:]
rows = []
for log in sorted(glob.glob(os.path.join(tmp, "*.ptxas"))):
    src = os.path.basename(log)[:-len(".ptxas")]
    fn = arch = None
    for line in open(log):
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            fn, arch = m.groups()
            spill = None
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn:
            spill = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if m and fn:
            name = subprocess.run(["c++filt", fn], capture_output=True, text=True).stdout.strip() or fn
            name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
            name = re.sub(r"\(.*\)$", "", name)
            rows.append((src, name, arch, int(m.group(1)), spill or 0, int(m.group(2))))
            fn = None
os.makedirs(os.path.dirname(report), exist_ok=True)
with open(report, "w") as f:
    f.write("# CUDA kernels: ptxas resources per instantiation\n\n")
    f.write(f"Written by `scripts/build_cuda.sh` ({nvcc}). Registers per thread, spill bytes (stores + loads) and "
            "static shared memory. The row kernels (transpose-reduce, decoder-norm) carry `__launch_bounds__(1024)` "
            "(at most 64 registers) and hold CPT columns per thread: CPT <= 4 covers d <= 4096 (LLaDA, Dream) "
            "without spills; CPT 8 (d <= 8192) spills a little, CPT 16 (d <= 16384) by design.\n\n")
    f.write("| file | kernel | arch | registers | spill bytes | smem bytes |\n|---|---|---|---|---|---|\n")
    for r in sorted(rows):
        f.write("| " + " | ".join(str(v) for v in r) + " |\n")
print(f"wrote {report} ({len(rows)} kernel instantiations)")
PY
