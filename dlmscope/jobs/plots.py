"""The jobs' figures, drawn from their result dicts: the steering sweep (:func:`plot_sweep`,
:func:`plot_by_layer`, :func:`plot_tradeoff`, from :func:`dlmscope.jobs.steer.run_steer`), the decoding orders
(:func:`plot_order`, from :func:`dlmscope.jobs.order.run_order`), the base → instruct transfer
(:func:`plot_transfer`, from :func:`dlmscope.jobs.transfer.run_transfer`) and the crosscoder diff
(:func:`plot_crosscoder`, from :func:`dlmscope.jobs.crosscoder.run_crosscoder_diff`).

The figures read only the result dicts, so this module imports no model, SAE or trainer: the demo draws them
without importing the training stack. matplotlib (the ``plot`` extra) is imported where a figure is drawn, and
a Figure is drawn without pyplot (no global backend state is touched).

The result dicts may come from the jobs' JSON files, where a NaN is written as ``null``: every number read here
may be None, drawn as NaN (a gap).

The order job's step labels and SAE-guided orders (:data:`STEPS`, :data:`SAE_ORDERS`) and the steering
conditions' names (:func:`condition_label`) live here, where the figures need them; :mod:`dlmscope.jobs.order`
and :mod:`dlmscope.jobs.steer` import them from here and export them as their own.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["SAE_ORDERS", "STEPS", "condition_label", "plot_sweep", "plot_by_layer", "plot_tradeoff", "plot_order",
           "plot_transfer", "plot_crosscoder"]

#: the order job's SAE-guided orders (dashed in its figures) and step labels (the x axis)
SAE_ORDERS = ("sae_stable", "sae_stable_entropy")
STEPS = ("one", "half", "all")


def _f(x) -> float:
    """A number of a result, None (a NaN read back from JSON) as NaN."""
    return math.nan if x is None else x


def _grid(rows) -> list[list[float]]:
    """A 2-D list of numbers with None as NaN."""
    return [[_f(v) for v in row] for row in rows]


def condition_label(scope, schedule) -> str:
    """``"masked, last 50%"`` — how plots and tables name a (scope, schedule)."""
    if isinstance(schedule, (tuple, list)) and len(schedule) == 2 and isinstance(schedule[0], str):
        sched = f"{schedule[0]} {100 * schedule[1]:g}%"
    elif schedule == "all":
        sched = "all steps"
    else:
        sched = f"steps {schedule}"
    return f"{scope}, {sched}"


# ------------------------------------------------------------------------------------------------- steering
def _by_condition(result: dict) -> dict[str, list[dict]]:
    """``{condition label: summary rows in α order}``."""
    groups: dict[str, list[dict]] = {}
    for row in result["summary"]["rows"]:
        groups.setdefault(condition_label(row["scope"], row["schedule"]), []).append(row)
    return groups


def _over(rows: list[dict], key: str = "concept_delta") -> str:
    """What the rows' ``key`` intervals were resampled over, e.g. ``"concepts × prompts"`` (older results: prompts)."""
    over = next((r[key].get("over") for r in rows if r.get(key)), None)
    return " × ".join(over) if over else "prompts"


def _band(ax, a, ci: list[dict], **kw):
    """The means of ``ci`` against ``a`` with their intervals as a band; returns the line."""
    line, = ax.plot(a, [_f(c["mean"]) for c in ci], **kw)
    ax.fill_between(a, [_f(c["low"]) for c in ci], [_f(c["high"]) for c in ci], color=line.get_color(), alpha=0.2)
    return line


def plot_sweep(result: dict, path: Path) -> None:
    """Against α: each feature's concept-rate change (thin), the mean with its interval (bold, per condition)
    and the random-latent control's (dashed); the median perplexity ratio (the controls' dashed); the composite
    with its interval (bold) and the paper's score (dotted)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    first = next(iter(_by_condition(result)))
    for key, entry in result["features"].items():
        runs = [p for p in entry["sweep"] if condition_label(p["scope"], p["schedule"]) == first]
        a = [p["alpha"] for p in runs]
        axes[0].plot(a, [_f(p["concept_after"]) - _f(p["concept_before"]) for p in runs], lw=0.8, alpha=0.5,
                     label=key)
    all_rows = result["summary"]["rows"]
    for label, rows in _by_condition(result).items():
        a = [r["alpha"] for r in rows]
        line = _band(axes[0], a, [r["concept_delta"] for r in rows], lw=2.2, marker="o", label=f"mean: {label}")
        colour = line.get_color()
        axes[1].plot(a, [_f(r["ppl_ratio_median"]) for r in rows], marker="o", color=colour, label=label)
        for kind, ls in (("random_latent", "--"), ("random_direction", ":")):
            ctl = [r.get("controls", {}).get(kind) for r in rows]
            if all(ctl):
                axes[0].plot(a, [_f(c["concept_delta"]["mean"]) for c in ctl], ls=ls, color=colour,
                             label=f"{kind.replace('_', ' ')} control: {label}")
                axes[1].plot(a, [_f(c["ppl_ratio_median"]) for c in ctl], ls=ls, color=colour)
        if all(r.get("composite") for r in rows):
            _band(axes[2], a, [r["composite"] for r in rows], lw=2.2, marker="o", color=colour)
        axes[2].plot(a, [_f(r["score_mean"]) for r in rows], ls=":", marker=".", color=colour)
    titles = (f"concept rate change (judge), 95% CI over {_over(all_rows)}; dashed: controls",
              "median perplexity ratio (steered / baseline)",
              f"composite (log-ratio fluency), CI over {_over(all_rows, 'composite')}; dotted: paper's score")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("α")
        ax.set_title(title, fontsize=8)
    axes[1].set_yscale("log")
    axes[2].set_yscale("symlog")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_by_layer(results: dict[str, dict[int, dict]], path: Path) -> None:
    """Per layer (columns): the mean concept-rate change with its interval and the random-latent control's
    (dashed) (top) and the median perplexity ratio (bottom) against α, scope all, one line per model;
    ``results`` is ``{model: {layer: run_steer result}}``."""
    from matplotlib.figure import Figure

    layers = sorted({L for by_layer in results.values() for L in by_layer})
    fig = Figure(figsize=(max(4.0, 2.6 * len(layers)), 5.2))
    axes = fig.subplots(2, len(layers), squeeze=False)
    over = "prompts"
    for j, L in enumerate(layers):
        for name, by_layer in results.items():
            if L not in by_layer:
                continue
            rows = [r for r in by_layer[L]["summary"]["rows"] if r["scope"] == "all" and r["schedule"] == "all"]
            a = [r["alpha"] for r in rows]
            over = _over(rows)
            line = _band(axes[0, j], a, [r["concept_delta"] for r in rows], marker="o", ms=3, label=name)
            ctl = [r.get("controls", {}).get("random_latent") for r in rows]
            if all(ctl):
                axes[0, j].plot(a, [_f(c["concept_delta"]["mean"]) for c in ctl], ls="--", color=line.get_color(),
                                label=f"{name}: random-latent control")
            axes[1, j].plot(a, [_f(r["ppl_ratio_median"]) for r in rows], marker="o", ms=3, color=line.get_color())
        axes[0, j].set_title(f"block {L}", fontsize=9)
        axes[0, j].axhline(0, color="grey", lw=0.6)
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("α")
    axes[0, 0].set_ylabel(f"Δ concept rate (95% CI over {over})", fontsize=8)
    axes[1, 0].set_ylabel("median perplexity ratio")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_tradeoff(results: dict[str, dict], path: Path) -> None:
    """Concept gained against fluency lost: one point per (model, condition, α), the mean concept-rate change
    with its interval against the median perplexity ratio; the curves of a condition join its α values; the
    matched-fluency bound (perplexity ratio 2) is the dotted vertical."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    over = "prompts"
    for name, result in results.items():
        for label, rows in _by_condition(result).items():
            over = _over(rows)
            x = [_f(r["ppl_ratio_median"]) for r in rows]
            ci = [{key: _f(r["concept_delta"][key]) for key in ("mean", "low", "high")} for r in rows]
            y = [c["mean"] for c in ci]
            err = [[c["mean"] - c["low"] for c in ci], [c["high"] - c["mean"] for c in ci]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=2, label=f"{name}: {label}" if name else label)
            for xi, yi, r in zip(x, y, rows):
                ax.annotate(f"{r['alpha']:g}", (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(2.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("median perplexity ratio (fluency lost →)")
    ax.set_ylabel(f"mean concept-rate change (95% CI over {over})", fontsize=8)
    ax.set_title("concept gained per fluency lost (labels: α)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------ decoding orders
def plot_order(result: dict, path_prefix) -> list:
    """``<prefix>_accuracy.png`` (order-sensitive accuracy vs steps per order, with intervals),
    ``<prefix>_dynamics.png`` (per order: masked-position stability, layer × step, and pre-decode stability,
    layer × position, for the largest task group replayed) and ``<prefix>_progress.png`` (masked-position
    stability vs normalised progress, all groups pooled)."""
    from matplotlib.figure import Figure

    prefix = Path(path_prefix)
    paths = []
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for order, by_steps in result["accuracy"].items():
        xs = [s for s in STEPS if s in by_steps and by_steps[s]["order_sensitive"]]
        c = [{key: _f(v) for key, v in by_steps[s]["order_sensitive"].items()} for s in xs]
        ax.errorbar([STEPS.index(s) for s in xs], [x["mean"] for x in c],
                    yerr=[[x["mean"] - x["low"] for x in c], [x["high"] - x["mean"] for x in c]],
                    marker="o", capsize=2, label=order, ls="--" if order in SAE_ORDERS else "-")
    ax.set_xticks(range(len(STEPS)), ["1 step", "⌈G/2⌉ steps", "G steps"])
    ax.set_ylabel("exact match, multi-answer tasks (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "_accuracy.png"))
    fig.savefig(paths[-1], dpi=110)

    stats = result["statistics"]
    if stats:
        orders = list(stats)
        group = max(next(iter(stats.values())), key=lambda g: int(g.split("/")[1]))
        fig = Figure(figsize=(7, 1.3 * len(orders) + 0.8), layout="constrained")
        axes = fig.subplots(len(orders), 2, squeeze=False)
        for r, order in enumerate(orders):
            d = stats[order].get(group)
            if d is None:
                continue
            for c, (data, xlabel) in enumerate(((d["step_stability"], "step"),
                                                (d["per_position"]["pre_stability"], "answer position"))):
                im = axes[r, c].imshow(torch.tensor(_grid(data), dtype=torch.float32).numpy(), aspect="auto", vmin=0,
                                       vmax=1, cmap="viridis")
                axes[r, c].set_yticks(range(len(d["layers"])), [str(L) for L in d["layers"]], fontsize=6)
                axes[r, c].set_xlabel(xlabel, fontsize=7)
            axes[r, 0].set_ylabel(order, fontsize=7)
        fig.colorbar(im, ax=axes, shrink=0.5, label="top-K Jaccard (masked)")
        fig.suptitle(f"feature stability while masked, {group} tasks (rows: layer)", fontsize=9)
        paths.append(prefix.with_name(prefix.name + "_dynamics.png"))
        fig.savefig(paths[-1], dpi=100)
        paths.append(prefix.with_name(prefix.name + "_progress.png"))
        _plot_progress(stats, paths[-1])
    return paths


def _plot_progress(stats: dict, path, bins: int = 5) -> None:
    """Masked-position stability against normalised progress ``(s + ½) / S``, pooled over task groups into
    ``bins`` bins: one panel per layer, one line per order."""
    from matplotlib.figure import Figure

    layers = next(iter(next(iter(stats.values())).values()))["layers"]
    fig = Figure(figsize=(3.2 * len(layers), 3.2), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    centres = [(b + 0.5) / bins for b in range(bins)]
    for order, groups in stats.items():
        for li, L in enumerate(layers):
            sums, counts = [0.0] * bins, [0] * bins
            for d in groups.values():
                row = d["step_stability"][li]
                for step, v in enumerate(row):
                    if v is not None and v == v:
                        b = min(bins - 1, int((step + 0.5) / len(row) * bins))
                        sums[b] += v
                        counts[b] += 1
            ys = [sm / n if n else float("nan") for sm, n in zip(sums, counts)]
            axes[li].plot(centres, ys, marker="o", ms=3, label=order, ls="--" if order in SAE_ORDERS else "-")
    for li, L in enumerate(layers):
        axes[li].set_title(f"block {L}", fontsize=9)
        axes[li].set_xlabel("denoising progress (step / steps)")
        axes[li].set_ylim(0, 1.02)
    axes[0].set_ylabel("top-K Jaccard of masked positions")
    axes[-1].legend(fontsize=6)
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------ base → instruct
def plot_transfer(result: dict, path: str | Path) -> Path:
    """A PNG of the per-layer numbers: FVE of the three conditions (and the AR control), Hungarian-matched
    decoder fractions against chance, and the median latent activation correlation."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    layers = list(result["summary"])
    s = [result["summary"][L] for L in layers]
    ctrl = "control_fve_ratio" in s[0]
    x = torch.arange(len(layers)).double()
    fig = Figure(figsize=(3 * max(3.8, 0.7 * len(layers)), 5.0))
    ax_fve, ax_dec, ax_cor = fig.subplots(1, 3)

    def grouped_bars(ax, bars):  # one group of bars per layer
        w = 0.8 / len(bars)
        for i, (key, label) in enumerate(bars):
            ax.bar((x + (i - (len(bars) - 1) / 2) * w).tolist(), [_f(r[key]) for r in s], w, label=label)

    grouped_bars(ax_fve, [("fve_base_on_base", "base SAE, base acts"),
                          ("fve_base_on_target", "base SAE, instruct acts"),
                          ("fve_target_on_target", "instruct SAE, instruct acts")]
                 + ([("control_fve_base_on_target", "base SAE, AR acts (control)")] if ctrl else []))
    ax_fve.set_title("held-out FVE", fontsize=10)
    series = [("", "instruct")] + ([("control_", "AR control")] if ctrl else [])
    grouped_bars(ax_dec, [(f"{pre}hungarian_frac_gt_{t}", f"{label}: fraction cos > {t}")
                          for pre, label in series for t in (0.9, 0.7)])
    # the mean matched cosines as a horizontal mark across each layer's group of bars
    marks = [("hungarian_mean", "instruct", "-"), ("chance_hungarian_mean", "random SAE (chance)", ":")]
    marks += [("init_hungarian_mean", "shared init", "--")] if "init_hungarian_mean" in s[0] else []
    for key, label, ls in marks:
        ax_dec.hlines([_f(r[key]) for r in s], (x - 0.45).tolist(), (x + 0.45).tolist(), colors="black", linestyles=ls,
                      label=f"mean cos: {label}")
    ax_dec.set_title("Hungarian-matched decoder rows, base vs other", fontsize=10)

    for pre, label, mk in (("", "instruct", "o"),) + ((("control_", "AR control", "s"),) if ctrl else ()):
        ax_cor.plot(x.tolist(), [_f(r[f"{pre}corr_median"]) for r in s], marker=mk, label=f"{label}: median r")
        ax_cor.plot(x.tolist(), [_f(r[f"{pre}corr_frac_gt_0.9"]) for r in s], marker=mk, ls="--",
                    label=f"{label}: fraction r > 0.9")
    ax_cor.set_title("base SAE latent activation, base vs target", fontsize=10)

    for ax in (ax_fve, ax_dec, ax_cor):
        ax.set_xticks(x.tolist(), [f"L{L}" for L in layers])
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    cfg = result["config"]
    fig.suptitle(f"base → instruct SAE transfer (policy {cfg['policy']}, n = {cfg['n_latents']}, k = {cfg['k']})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_crosscoder(result: dict, path: str | Path) -> Path:
    """A PNG with one panel per layer: the relative decoder norm ρ of the alive latents (0 = base only, 1 = target
    only), one histogram per crosscoder seed, the placebo's dashed, and the exclusive thresholds as lines."""
    from matplotlib.figure import Figure

    cfg, layers = result["config"], list(result["layers"])
    fig = Figure(figsize=(4.2 * len(layers), 3.6))
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    bins = torch.linspace(0, 1, 51).tolist()
    for ax, L in zip(axes, layers):
        entry = result["layers"][L]
        groups = [("target", entry["runs"], "-")] + ([("placebo", entry["placebo"]["runs"], "--")]
                                                     if "placebo" in entry else [])
        for name, runs, ls in groups:
            for r, run in enumerate(runs):
                ax.hist([_f(v) for v in run["rho_alive"]], bins=bins, histtype="step", ls=ls,
                        color="tab:blue" if name == "target" else "tab:gray",
                        label=f"{name} seeds" if r == 0 else None)
        for t in (cfg["low"], cfg["high"]):
            ax.axvline(t, color="black", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("ρ = |W_dec target| / (|W_dec base| + |W_dec target|)")
        counts = {side: v["counts"] for side, v in entry["verdict"].items()}
        ax.set_title(f"L{L}: exclusive created {counts['created']['low']:.0f}–{counts['created']['high']:.0f}, "
                     f"removed {counts['removed']['low']:.0f}–{counts['removed']['high']:.0f}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"crosscoder diff, alive latents (policy {cfg['policy']}, n = {cfg['n_latents']}, k = {cfg['k']}, "
                 f"{cfg['seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
