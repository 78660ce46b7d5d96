"""The demo's plots: FVE vs k, ΔLM per layer, planted-concept F1 heatmap, steering (PNG files)."""
from __future__ import annotations

from pathlib import Path

import torch

from dlmscope.jobs.plots import plot_by_layer, plot_crosscoder, plot_order, plot_transfer
from .config import RUN_LABELS, DemoConfig
from .findings import get
from .seeds import seed_summary

__all__ = ["write_plots"]


def write_plots(results: dict, cfg: DemoConfig, out: Path) -> list[Path]:
    """``fve_vs_k.png``, ``delta_lm.png``, ``concept_f1.png`` and (with a steering section) ``steering.png``
    under ``out``."""
    # matplotlib is the `plot` extra, imported only to draw; Figure without pyplot touches no global backend state
    from matplotlib.figure import Figure

    paths = []
    # line style and marker per run
    styles = {k: v for k, v in zip(RUN_LABELS, (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")))
              if k in results["runs"]}

    fig = Figure(figsize=(3.2 * len(cfg.layers), 3.2))
    axes = fig.subplots(1, len(cfg.layers), sharey=True, squeeze=False)
    seeds = seed_summary(results, list(cfg.layers), cfg.k_ref)["fve"]
    for ax, L in zip(axes[0], cfg.layers):
        for key, (ls, mk) in styles.items():
            line, = ax.plot(cfg.ks, [get(results, key, L, k, "fve") for k in cfg.ks], ls=ls, marker=mk,
                            label=RUN_LABELS[key])
            sp = seeds[key][str(L)]
            if sp["n"] > 1:   # min–max over the init seeds that did not fail, at k_ref
                ax.errorbar([cfg.k_ref], [sp["mean"]], yerr=[[sp["mean"] - sp["low"]], [sp["high"] - sp["mean"]]],
                            color=line.get_color(), marker="_", capsize=3, lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg.ks, [str(k) for k in cfg.ks])
        ax.set_title(f"layer {L}")
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out FVE")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"FVE vs k (n = {cfg.n_latents} latents, d_model = {results['d_model']}); at k = {cfg.k_ref} the "
                 f"mean and min–max over {cfg.sae_seeds} init seeds")
    fig.tight_layout()
    paths.append(out / "fve_vs_k.png")
    fig.savefig(paths[-1], dpi=110)

    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    x = torch.arange(len(cfg.layers)).float()
    # (run, its delta key, its clean-loss key, the objective)
    series = [("dlm/mask", "mask_delta", "mask_clean", "L_mask"), ("dlm/unmask", "mask_delta", "mask_clean", "L_mask")]
    series += [(key, "delta", "clean", "next-token CE") for key in ("ar/clean", "ar_matched/clean")
               if key in results["runs"]]
    w = 0.8 / len(series)
    for i, (key, dk, ck, objective) in enumerate(series):
        label = f"{RUN_LABELS[key]} ({objective})"
        d = [get(results, key, L, cfg.k_ref, "delta", dk) for L in cfg.layers]
        rel = [get(results, key, L, cfg.k_ref, "delta", dk) / get(results, key, L, cfg.k_ref, "delta", ck)
               for L in cfg.layers]
        shift = (i - (len(series) - 1) / 2) * w
        axes[0].bar((x + shift).tolist(), d, w, label=label)
        axes[1].bar((x + shift).tolist(), rel, w, label=label)
    for ax, title in zip(axes, ("ΔLM loss (SAE − clean), each model's own objective",
                                "scale-free: ΔLM / clean loss")):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x.tolist(), [f"L{L}" for L in cfg.layers])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Splicing the SAE in at every position (k = {cfg.k_ref})")
    fig.tight_layout()
    paths.append(out / "delta_lm.png")
    fig.savefig(paths[-1], dpi=110)

    names = list(next(iter(results["runs"]["dlm/unmask"].values()))[str(cfg.k_ref)]["concepts_clean"]["concepts"])
    rows, labels = [], []
    for key in (k for k in RUN_LABELS if k in results["runs"]):
        for L in cfg.layers:
            c = get(results, key, L, cfg.k_ref, "concepts_clean", "concepts")
            rows.append([c[n]["f1"] for n in names])
            labels.append(f"{RUN_LABELS[key]} L{L}")
    fig = Figure(figsize=(1.0 + 0.6 * len(names), 0.9 + 0.32 * len(rows)))
    ax = fig.subplots()
    im = ax.imshow(rows, vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="best-latent F1")
    ax.set_title(f"Planted concepts: best latent's F1 on clean held-out text (k = {cfg.k_ref})", fontsize=10)
    fig.tight_layout()
    paths.append(out / "concept_f1.png")
    fig.savefig(paths[-1], dpi=110)

    if results.get("steering"):
        st = results["steering"]
        labels = {"dlm": "DLM (Unmask-SAE)", "ar": "AR init twin", "ar_matched": "matched AR twin"}
        by_model = {labels[key]: {int(L): st["runs"][f"{key}/{L}"] for L in st["layers"]}
                    for key in ["dlm"] + st.get("twins", ["ar"])}
        paths.append(out / "steering.png")
        plot_by_layer(by_model, paths[-1])
    if results.get("orders"):
        paths += plot_order(results["orders"], out / "order")
    if results.get("transfer"):
        paths.append(plot_transfer(results["transfer"], out / "transfer.png"))
    if results.get("crosscoder"):
        paths.append(plot_crosscoder(results["crosscoder"], out / "crosscoder.png"))
    return paths
