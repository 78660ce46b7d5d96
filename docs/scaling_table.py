"""Writes docs/scaling.md: memory per rank and bytes per step of latent-parallel Top-K SAE training, modelled
(not measured).

    python docs/scaling_table.py            # rewrite docs/scaling.md
    python docs/scaling_table.py --check    # exit 1 if docs/scaling.md differs (tests/train/test_latent_parallel_scaling.py)

Every number in the document comes from :func:`plan` below, which counts what dlmscope.train.latent_parallel and
dlmscope.train.latent_trainer allocate and send; the hardware figures are assumptions (ASSUMED), not measurements.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent / "scaling.md"

#: assumptions, not measurements
ASSUMED = {
    "tflops_spec": 990.0,       # H100 SXM bf16 dense, spec sheet
    "tflops_real": 650.0,       # what a large bf16 GEMM reaches in practice (~600-700)
    "nvlink_GBps": 450.0,       # NVLink 4, per GPU per direction, inside one 8-GPU node
    "ib_GBps": 50.0,            # InfiniBand NDR 400 Gb/s, one NIC per GPU, between nodes
    "gpus_per_node": 8,
    "hbm_GB": 80.0,
}
D_MODEL, K, BATCH = 4096, 64, 16384
K_AUX = D_MODEL // 2             # the recipe's AuxK width, min(d/2, n)
ENCODE_TILE = 4096               # latents per encoder tile (chunked encoder; the fused one holds less)
LATENTS = {"16k": 16384, "1M": 1 << 20, "16M": 1 << 24}
GPUS = (8, 64)


@dataclasses.dataclass
class Plan:
    n: str
    gpus: int
    data: int
    latent: int
    mem: dict            # GB per rank by kind
    comm: dict           # bytes per rank per step by collective
    seconds: dict        # time of each collective at the assumed link speed
    gemm_s: float        # encoder GEMM of this rank's rows x latents at the realistic TFLOP/s


def plan(n_name: str, gpus: int, latent: int) -> Plan:
    n, d = LATENTS[n_name], D_MODEL
    data = gpus // latent
    n_r, rows = -(-n // latent), BATCH // data      # the largest shard; this rank's rows
    f32, pair = 4, 8                                # bytes: fp32; a (value bits, int32 id) candidate
    merged = pair + 8                               # a gathered candidate during the merge: the pair + its fp32
                                                    # value unpacked and regrouped [B, R w] (ids read in place)
    weights = (2 * n_r * d + n_r + d) * f32
    mem = {
        "weights": weights,
        "adam": 2 * weights,                        # exp_avg + exp_avg_sq (Adam for W_enc/biases, the fused W_dec step)
        "grads": weights,
        "bf16 casts": 2 * n_r * d * 2,              # autocast copies of W_enc, W_dec
        "activations": (4 * rows * d * f32          # x, x_hat partial, AuxK partial, residual
                        + (latent * rows * (K + K_AUX) * merged if latent > 1 else 0)  # gathered candidates
                        + rows * min(ENCODE_TILE, n_r) * f32),  # one encoder tile
    }
    mem = {key: v / 1e9 for key, v in mem.items()}
    comm, seconds = {}, {}
    in_node = latent <= ASSUMED["gpus_per_node"]
    latent_bw = ASSUMED["nvlink_GBps"] if in_node else ASSUMED["ib_GBps"]
    data_bw = ASSUMED["nvlink_GBps"] if gpus <= ASSUMED["gpus_per_node"] else ASSUMED["ib_GBps"]
    if latent > 1:
        ring = 2 * (latent - 1) / latent
        comm["gather top-k"] = (latent - 1) * rows * K * pair
        comm["gather AuxK"] = (latent - 1) * rows * K_AUX * pair
        comm["all-reduce x_hat"] = ring * rows * d * f32
        comm["all-reduce AuxK x_hat"] = ring * rows * d * f32
        for key in list(comm):
            seconds[key] = comm[key] / (latent_bw * 1e9)
    if data > 1:
        ring = 2 * (data - 1) / data
        comm["all-reduce grads"] = ring * weights
        comm["all-reduce fired"] = ring * n_r * 8   # float64 flags, one per local latent
        for key in ("all-reduce grads", "all-reduce fired"):
            seconds[key] = comm[key] / (data_bw * 1e9)
    gemm_s = 2 * rows * d * n_r / (ASSUMED["tflops_real"] * 1e12)
    return Plan(n_name, gpus, data, latent, mem, comm, seconds, gemm_s)


def plans() -> list[Plan]:
    out = []
    for n_name in LATENTS:
        for gpus in GPUS:
            for latent in sorted({1, ASSUMED["gpus_per_node"], gpus}):
                if latent <= LATENTS[n_name]:
                    out.append(plan(n_name, gpus, latent))
    return out


def _gb(x: float) -> str:
    return f"{x:,.2f}" if x < 10 else f"{x:,.0f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:,.2f}" if s < 0.01 else f"{s * 1e3:,.0f}"


def _total(p: Plan) -> float:
    return sum(p.mem.values())


def _main(p: Plan) -> float:
    """Seconds of the collectives of a step without AuxK (AuxK's run on every step once ``dead_tokens`` tokens
    have passed)."""
    return sum(v for k, v in p.seconds.items() if "AuxK" not in k)


def _ratio(x: float) -> str:
    return f"{x:,.3f}" if x < 1 else f"{x:,.1f}"


def render() -> str:
    rows_mem, rows_comm = [], []
    for p in plans():
        total = _total(p)
        fits = "yes" if total <= ASSUMED["hbm_GB"] else "**no**"
        rows_mem.append(f"| {p.n} | {p.gpus} | {p.data} x {p.latent} | " + " | ".join(_gb(v) for v in p.mem.values())
                        + f" | {_gb(total)} | {fits} |")
        main = _main(p)
        aux = sum(v for k, v in p.seconds.items() if "AuxK" in k)
        gbytes = sum(p.comm.values()) / 1e9
        rows_comm.append(f"| {p.n} | {p.gpus} | {p.data} x {p.latent} | {_gb(gbytes)} | {_ms(main)} | {_ms(aux)} | "
                         f"{_ms(p.gemm_s)} | {_ratio(main / p.gemm_s)} | {_ratio((main + aux) / p.gemm_s)} |")
    a = ASSUMED
    small, m1, m1_node, m1_2d = plan("16k", 8, 1), plan("1M", 8, 1), plan("1M", 8, 8), plan("1M", 64, 8)
    m16, m16_all = plan("16M", 8, 1), plan("16M", 64, 64)
    fits16 = (f"reaches {_gb(_total(m16_all))} GB, within {a['hbm_GB']:.0f} GB but with little room (AuxK's "
              "candidates dominate: item 1 below)." if _total(m16_all) <= a["hbm_GB"] else
              f"reaches {_gb(_total(m16_all))} GB, past {a['hbm_GB']:.0f} GB: as built, 16M latents need the "
              "thresholded AuxK gather of item 1 below (or AuxK off).")
    state16 = m16.mem["weights"] + m16.mem["adam"] + m16.mem["grads"]
    min_r16 = next(r for r in (2 ** i for i in range(12)) if state16 / r <= a["hbm_GB"])
    return f"""# Scaling out: latent-parallel Top-K SAEs, modelled (not measured)

<!-- generated by docs/scaling_table.py; tests/train/test_latent_parallel_scaling.py fails if this file drifts -->

What `dlmscope.train.latent_parallel` / `dlmscope.train.latent_trainer` hold and send per rank for one training step of one
SAE with d = {D_MODEL}, k = {K}, AuxK k_aux = d/2 = {K_AUX}, a global batch of B = {BATCH:,} tokens, fp32 master
weights, on 8 and 64 H100s. A grid `D x R` has D data ranks (each takes B/D rows) by R latent ranks (each holds
n/R latents). `D x 1` is plain data parallelism (the DDP trainer); `1 x R` is pure latent parallelism.

**Assumptions, not measurements:** H100 bf16 dense {a['tflops_spec']:.0f} TFLOP/s (spec), {a['tflops_real']:.0f}
TFLOP/s realistic for the encoder GEMM (used below); NVLink {a['nvlink_GBps']:.0f} GB/s per GPU per direction inside
an {a['gpus_per_node']}-GPU node; InfiniBand {a['ib_GBps']:.0f} GB/s per GPU between nodes; {a['hbm_GB']:.0f} GB HBM.
A latent group is R contiguous ranks, so it stays inside a node while R <= {a['gpus_per_node']}; a ring runs at its
slowest link. Collectives are costed as rings (all-reduce moves 2(P-1)/P of the buffer per rank, all-gather
(P-1) pieces); nothing is overlapped with compute.

## Running it

```python
# torchrun --nproc-per-node 8 train.py   (nccl on CUDA, gloo on CPU)
from dlmscope.train.latent_parallel import LatentShard, make_grid
from dlmscope.train.latent_trainer import LatentParallelTrainer, gather_saes
from dlmscope.train import sharded_checkpoint
from dlmscope.train.trainer import TrainConfig

grid = make_grid(latent_size=8, device="cuda")          # DeviceMesh ("data", "latent"): world = D x 8
shards = [LatentShard.init(4096, 1 << 20, k, *grid.bounds(1 << 20), seed=k, device="cuda") for k in (64, 128)]
trainer = LatentParallelTrainer(shards, grid, TrainConfig(total_tokens=..., checkpoint_dir="ckpt"))
trainer.fit(stream)     # the same batches on every latent rank of a data rank (dlmscope.data.ranks)
sharded_checkpoint.export(sharded_checkpoint.latest("ckpt"), "saes/", "saelens")   # in one process, later
```

Measured on CPU (gloo), `benchmarks/results/cpu-latent-parallel.md` (`benchmarks/latent_parallel_scaling.py`,
which also runs on a multi-GPU machine with `--device cuda`).

## Memory per rank (GB)

Weights = W_enc + W_dec [n/R, d] + biases; Adam = two moments of every weight; grads = one dense copy; bf16 casts =
the autocast copies of both matrices (0 without autocast); activations = x, the partial reconstructions and the
residual [B/D, d], the gathered candidates [R, B/D, k + k_aux] during the merge (16 B each: the (value, id) pair
as sent, its fp32 value unpacked and regrouped per row; the ids are read in place at the winners; none for
`D x 1`), one encoder tile of
{ENCODE_TILE} latents.

| n | GPUs | grid D x R | weights | Adam | grads | bf16 casts | activations | total | fits {a['hbm_GB']:.0f} GB |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows_mem)}

## Communication per step vs the encoder GEMM

Per rank: the latent group's all-gather of the top-k candidates and all-reduce of x_hat (and the same two for
AuxK, which the trainer turns on once `dead_tokens` tokens have passed — by token count, whether or not a latent
is dead — so after warm-up every step pays them), the data group's all-reduce of all gradients and of the fired
flags. Times at the assumed link speeds; GEMM = 2 (B/D) d (n/R) FLOP at {a['tflops_real']:.0f} TFLOP/s, a bf16
GEMM (training with `autocast_dtype="bfloat16"`; the fp32 default runs the GEMM several times slower).

| n | GPUs | grid D x R | GB sent per step | comm ms (no AuxK) | AuxK comm ms | encoder GEMM ms | comm / GEMM | with AuxK |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows_comm)}

## Reading the tables

- **16k latents** (the paper's size): {_gb(small.mem['weights'])} GB of weights; every rank holds the whole SAE,
  and latent parallelism only adds communication to a {_ms(small.gemm_s)} ms GEMM. Use plain data parallelism
  (`D x 1`), whose only cost is the gradient all-reduce.
- **1M latents**: {_gb(m1.mem['weights'])} GB of weights + {_gb(m1.mem['adam'])} GB of Adam state do not fit one
  {a['hbm_GB']:.0f} GB GPU; `D x 1` is out. `1 x 8` inside a node fits ({_gb(_total(m1_node))} GB per rank) and its
  communication over NVLink ({_ms(_main(m1_node))} ms) is small against a {_ms(m1_node.gemm_s)} ms GEMM. On 64 GPUs,
  `8 x 8` pays an all-reduce of every gradient over InfiniBand ({_ms(m1_2d.seconds['all-reduce grads'])} ms against
  a {_ms(m1_2d.gemm_s)} ms GEMM): a 1M-latent SAE trains best on one node per SAE (or per k of the sweep), with data
  parallelism across nodes only when the step is long enough to hide it.
- **16M latents**: {_gb(m16.mem['weights'])} GB of weights, {_gb(m16.mem['weights'] + m16.mem['adam'] + m16.mem['grads'])}
  GB with Adam state and gradients: of these grids only `1 x 64` holds the state ({_gb(_total(m16_all) - m16_all.mem['activations'])}
  GB per rank before activations); with the AuxK merge's {_gb(m16_all.mem['activations'])} GB of activations it
  {fits16} There the GEMM is {_ms(m16_all.gemm_s)} ms and the top-k path sends {_ms(_main(m16_all))} ms over
  InfiniBand, which an overlapped implementation could hide; but AuxK's gather alone is
  {_ms(m16_all.seconds['gather AuxK'])} ms.

## Where this design stops scaling

1. **The candidate all-gather and merge grow with R.** Each rank receives (R-1) x [B/D, k] pairs and the merge
   runs top-k over [B/D, R k]. For k = 64 that stays small, but the AuxK selection uses k_aux = d/2 = {K_AUX}
   columns: at R = 64 the gathered AuxK candidates are
   {_gb(64 * BATCH * K_AUX * 8 / 1e9)} GB per rank per step, more memory and time than everything else. Fixes,
   not built: gather only each rank's dead-latent candidates above a global threshold (one all-reduce of the
   local k_aux-th values first), or cap k_aux per rank at k_aux / R (an approximation of the recipe).
2. **x_hat is all-reduced at full size.** [B/D, d] in fp32 (the partials are summed in float32, also under a
   bf16 autocast) per step regardless of n: cheap on NVLink, a floor of
   ~{_ms(plan('16M', 64, 64).seconds['all-reduce x_hat'])} ms per step over InfiniBand at B = 16k. bf16 partials
   would halve it (at a precision cost the tests do not cover).
3. **Data parallelism of a sharded SAE all-reduces dense gradients**, (2 n/R d) floats per step, although only
   rows of latents selected in the batch are nonzero; beyond one node this dominates (the `8 x 8` rows). A
   row-sparse reduction (indices + rows of touched latents) is the fix.
4. **Weights per rank** at 16M latents (fp32 weights, Adam moments and gradients, no activations) need
   R >= {min_r16} to fit {a['hbm_GB']:.0f} GB; bf16 moments or an 8-bit optimiser would
   halve or quarter the R needed.
5. **Harvest under a latent grid is redundant**: every latent rank of a data rank runs the LM on the same rows
   (`dlmscope.data.ranks` slices by data rank). For an 8B model this costs R forwards per batch; the fix
   is to slice by world rank and all-gather x inside the latent group ([B/D, d] per step, as much as one x_hat
   all-reduce).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/scaling.md is not what this writes")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python docs/scaling_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
