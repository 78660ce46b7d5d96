"""FVE against L0 and planted-dictionary recovery for every SAE architecture on the same data (a small Pareto table).

The data are planted: ``n_true`` unit directions in ``d`` dimensions; each row switches direction i on with a
probability that falls with i (Zipf-like, ``active`` per row on average, so rows differ in how many directions they
carry — the case BatchTopK's variable per-row L0 is for), at magnitude ``scale · U(0.5, 1.5)``, plus a constant shift
and a little noise. Every SAE of a seed trains in ONE :class:`~dlmscope.train.trainer.Trainer` on one stream (Top-K,
BatchTopK and Matryoshka at each k, JumpReLU at each L0 coefficient), with the library's recipe; three init seeds
(the data stream shared), 0, 2 and 3: not 1, the planted directions' own generator seed (see ``SEEDS``; every SAE's
initial decoder is checked against the planted directions before training, :func:`check_init`). Held-out
(eval-mode rules): FVE, mean L0, the rows' L0 spread, the fraction of planted directions some decoder row matches
(cosine > 0.9), dead latents. The run-length and scale choices (the BatchTopK threshold's averaging, JumpReLU's
start threshold and bandwidth) are stated where they are set below.

    python docs/arch_study.py [--out docs]      # writes arch_study.json and arch_study.md
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from dlmscope import reference as R
from dlmscope.sae import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, TopKSAE
from dlmscope.train.log import LogConfig
from dlmscope.train.trainer import Trainer, TrainConfig
from dlmscope.util import atomic

D, N_TRUE, ACTIVE, SCALE, NOISE = 64, 256, 6.0, 5.0, 0.01
N = 512
KS = (3, 6, 12)
L0_COEFFICIENTS = (0.1, 0.3, 1.0, 3.0)
#: SAE init seeds. Not 1: PlantedData draws its directions as the first randn(256, 64) of a generator seeded 1, and
#: every SAE of seed s draws its decoder as randn(512, 64) from a generator seeded s, so seed 1's SAEs would START
#: at the planted dictionary (recovery 1.00 before training; check_init refuses any such init)
SEEDS = (0, 2, 3)
STEPS, ROWS = 800, 512
#: the threshold's moving average for an 800-step run (the default 0.999 is dictionary_learning's, for runs of
#: 10^4–10^5 steps: here it would still sit near the first batch's value at the end)
BETA = 0.99
#: JumpReLU's start threshold and bandwidth on this trainer's unit-variance activation scale: the library's defaults
#: (dlmscope.sae.jumprelu). The peers' differ: SAELens 6.54.12's JumpReLUTrainingSAEConfig starts θ at 0.01 with
#: bandwidth 0.05 and trains θ itself (arch_study_peers.py runs it so, on activations scaled to E|x|² = d);
#: dictionary_learning 0.1.0 starts θ at 0.001 (JumpReluAutoEncoder, after Rajamanoharan et al. 2024, App. I) with
#: bandwidth 0.001 (JumpReluTrainer's default). With 0.001 / 0.001 on this scale almost no pre-activation falls in
#: the window and θ barely moves (docs/architectures.md)
THETA0, BANDWIDTH = 0.1, 0.05


class PlantedData:
    """The planted problem (see the module docstring); ``batch(gen, rows)`` draws ``[rows, D]``."""

    def __init__(self, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.truth = torch.nn.functional.normalize(torch.randn(N_TRUE, D, generator=g), dim=1)
        self.shift = torch.randn(D, generator=g)
        weight = 1.0 / torch.arange(10, N_TRUE + 10, dtype=torch.float32)
        self.p = (ACTIVE * weight / weight.sum()).clamp_max(1.0)     # P(direction i on), Σ p = ACTIVE

    def batch(self, gen: torch.Generator, rows: int) -> torch.Tensor:
        on = torch.rand(rows, N_TRUE, generator=gen) < self.p
        mags = SCALE * (torch.rand(rows, N_TRUE, generator=gen) + 0.5)
        noise = NOISE * torch.randn(rows, D, generator=gen)
        return (on * mags) @ self.truth + self.shift + noise

    def stream(self, steps: int, seed: int = 7):
        gen = torch.Generator().manual_seed(seed)
        return (self.batch(gen, ROWS) for _ in range(steps))

    def recovered(self, W_dec: torch.Tensor) -> float:
        """The share of planted directions some decoder row matches at cosine > 0.9."""
        cos = self.truth @ torch.nn.functional.normalize(W_dec.detach().float(), dim=1).T
        return float((cos.max(1).values > 0.9).float().mean())


def make_saes(seed: int) -> list:
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731  (every SAE of a seed starts from that seed)
    saes = []
    for k in KS:
        saes += [TopKSAE(D, N, k, generator=g()), BatchTopKSAE(D, N, k, threshold_beta=BETA, generator=g()),
                 MatryoshkaSAE(D, N, k, prefixes=[N // 8, N // 4, N // 2, N], threshold_beta=BETA, generator=g())]
    saes += [JumpReLUSAE(D, N, 16, init_threshold=THETA0, eps=BANDWIDTH, generator=g(),
                         meta={"l0_coefficient": lam}) for lam in L0_COEFFICIENTS]
    return saes


def check_init(data: PlantedData, saes: list, seed: int) -> float:
    """Refuse to train SAEs whose initial decoder already matches planted directions; returns the largest share.

    At chance, two random unit vectors in d = 64 have cosine > 0.9 with probability ~1e-24, so over 256 × 512 pairs
    a random init matches none: any match means the init shares the data's random draws (as seed 1 would)."""
    shares = {label(sae): data.recovered(sae.W_dec) for sae in saes}
    bad = {name: share for name, share in shares.items() if share > 0}
    if bad:
        raise RuntimeError(f"init seed {seed}: the initial decoder already recovers planted directions before "
                           f"training (share per SAE: {bad}); the SAE init and PlantedData share random draws — "
                           "choose another init seed")
    return max(shares.values())


def label(sae) -> str:
    arch = sae.cfg.arch
    return f"{arch} λ={sae.cfg.meta['l0_coefficient']:g}" if arch == "jumprelu" else f"{arch} k={sae.k}"


def train_seed(data: PlantedData, seed: int) -> dict:
    """Train one seed's SAEs (JumpReLU SAEs one trainer per coefficient: the coefficient is the trainer's)."""
    saes = make_saes(seed)
    check_init(data, saes, seed)
    cfg = TrainConfig(steps=STEPS, lr=4e-3, warmup_steps=50, dead_tokens=ROWS * 50, norm_batches=5)
    quiet = LogConfig(log_every=0, progress=False)
    others = [s for s in saes if s.cfg.arch != "jumprelu"]
    Trainer(others, cfg, log=quiet).fit(data.stream(STEPS))
    for sae in saes:
        if sae.cfg.arch == "jumprelu":
            lam = sae.cfg.meta["l0_coefficient"]
            Trainer([sae], dataclasses.replace(cfg, l0_coefficient=lam), log=quiet).fit(data.stream(STEPS))
    held = data.batch(torch.Generator().manual_seed(99), 8192)
    out = {}
    with torch.no_grad():
        for sae in saes:
            sae.eval()
            values, indices = sae.encode(held)
            per_row = (values > 0).sum(-1).float()
            fired = torch.zeros(N, dtype=torch.bool)
            fired[indices[values > 0]] = True
            out[label(sae)] = {"arch": sae.cfg.arch, "fve": float(R.fraction_of_variance_explained(
                held, sae.decode(values, indices))), "l0": float(per_row.mean()), "l0_std": float(per_row.std()),
                "recovered": data.recovered(sae.W_dec), "dead": float((~fired).float().mean())}
    return out


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for name in per_seed[0]:
        rows = [s[name] for s in per_seed]
        out[name] = {"arch": rows[0]["arch"], **{key: {"mean": statistics.fmean(r[key] for r in rows),
                                                      "low": min(r[key] for r in rows),
                                                      "high": max(r[key] for r in rows)}
                                               for key in ("fve", "l0", "l0_std", "recovered", "dead")}}
    return out


def table(summary: dict) -> list[str]:
    fmt = lambda c, p=3: f"{c['mean']:.{p}f} [{c['low']:.{p}f}–{c['high']:.{p}f}]"  # noqa: E731
    lines = ["| SAE | mean L0 | L0 spread over rows (sd) | held-out FVE | planted directions recovered | dead |",
             "|---|---|---|---|---|---|"]
    for name, r in sorted(summary.items(), key=lambda kv: (kv[1]["arch"], kv[1]["l0"]["mean"])):
        lines.append(f"| {name} | {fmt(r['l0'], 2)} | {fmt(r['l0_std'], 2)} | {fmt(r['fve'])} | "
                     f"{fmt(r['recovered'], 2)} | {fmt(r['dead'], 2)} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="default: beside this script")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    data, started = PlantedData(), time.perf_counter()
    per_seed = [train_seed(data, s) for s in SEEDS]
    summary = summarise(per_seed)
    result = {"config": {"d": D, "n_true": N_TRUE, "active": ACTIVE, "n": N, "ks": KS,
                         "l0_coefficients": L0_COEFFICIENTS, "seeds": SEEDS, "steps": STEPS, "rows": ROWS},
              "interval": "min–max over SAE init seeds (the data stream shared)", "summary": summary,
              "per_seed": per_seed, "seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}
    out = Path(a.out)
    atomic.write_json(out / "arch_study.json", result)
    text = ["# SAE architectures on planted data: FVE against L0", "",
            f"Written by `docs/arch_study.py` in {result['seconds'] / 60:.1f} min ({result['threads']} threads). "
            f"Data: {N_TRUE} planted unit directions in d = {D}, {ACTIVE:g} on per row on average with Zipf-like "
            f"frequencies (rows differ in how many they carry), magnitudes {SCALE:g}·U(0.5, 1.5), a constant shift, "
            f"noise {NOISE}. SAEs: n = {N}; each seed's Top-K, BatchTopK and Matryoshka SAEs (prefixes n/8, n/4, "
            f"n/2, n) train side by side in one trainer, the JumpReLU SAEs one trainer per L0 coefficient, "
            f"{STEPS} steps × {ROWS} rows of the same stream; held-out 8192 rows, eval-mode rules. Each cell: "
            f"mean [min–max] over {len(SEEDS)} SAE init seeds ({', '.join(map(str, SEEDS))}; not 1, the planted "
            f"directions' generator seed, from which every SAE would start at the planted dictionary; before "
            f"training, every initial decoder is checked to match no planted direction).", ""] + table(summary)
    atomic.write_text(out / "arch_study.md", "\n".join(text) + "\n")
    print("\n".join(table(summary)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
