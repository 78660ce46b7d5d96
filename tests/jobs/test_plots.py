"""The jobs' figures draw from result dicts read back from their JSON files, where a NaN is ``null``."""
from __future__ import annotations

import json

import pytest

from dlmscope.jobs.plots import plot_by_layer, plot_order, plot_sweep, plot_tradeoff, plot_transfer
from dlmscope.util import atomic

pytest.importorskip("matplotlib")

NAN = float("nan")


def read_back(result: dict, tmp_path) -> dict:
    """``result`` as its job's JSON file gives it back (NaN written as null)."""
    atomic.write_json(tmp_path / "result.json", result)
    back = json.loads((tmp_path / "result.json").read_text())
    assert "NaN" not in (tmp_path / "result.json").read_text()
    return back


def steer_result() -> dict:
    ci = {"mean": NAN, "low": NAN, "high": 0.2}
    rows = [{"scope": "all", "schedule": "all", "alpha": a, "concept_delta": ci, "ppl_ratio_median": NAN,
             "score_mean": 0.1} for a in (1.0, 2.0)]
    sweep = [{"scope": "all", "schedule": "all", "alpha": a, "concept_after": NAN, "concept_before": 0.1,
              "score": NAN} for a in (1.0, 2.0)]
    return {"features": {"animals/3": {"sweep": sweep}}, "summary": {"rows": rows}}


def order_result() -> dict:
    stats = {"layers": [0, 2], "step_stability": [[0.5, NAN], [NAN, 0.4]],
             "per_position": {"pre_stability": [[NAN, 0.3], [0.2, NAN]]}}
    ci = {"mean": NAN, "low": 0.1, "high": NAN}
    return {"accuracy": {"entropy": {"one": {"order_sensitive": ci}, "all": {"order_sensitive": ci}}},
            "statistics": {"entropy": {"count/2": stats}, "left_to_right": {"count/2": stats}}}


def transfer_result() -> dict:
    keys = ("fve_base_on_base", "fve_base_on_target", "fve_target_on_target", "hungarian_frac_gt_0.9",
            "hungarian_frac_gt_0.7", "hungarian_mean", "chance_hungarian_mean", "corr_median", "corr_frac_gt_0.9")
    return {"summary": {"1": {k: NAN if i % 2 else 0.5 for i, k in enumerate(keys)}},
            "config": {"policy": "mask", "n_latents": 64, "k": 4}}


def test_21_11_figures_draw_results_read_back_from_json_with_nulls(tmp_path):
    steer = read_back(steer_result(), tmp_path)
    plot_sweep(steer, tmp_path / "sweep.png")
    plot_by_layer({"dlm": {4: steer}}, tmp_path / "layers.png")
    plot_tradeoff({"dlm": steer}, tmp_path / "tradeoff.png")
    paths = plot_order(read_back(order_result(), tmp_path), tmp_path / "order")
    plot_transfer(read_back(transfer_result(), tmp_path), tmp_path / "transfer.png")
    for path in [tmp_path / "sweep.png", tmp_path / "layers.png", tmp_path / "tradeoff.png", *paths,
                 tmp_path / "transfer.png"]:
        assert path.stat().st_size > 1000, path


def test_22_steer_figures_draw_the_controls_and_the_composite_read_back_from_json(tmp_path):
    over = {"concepts": 10, "prompts": 24}
    ci = {"mean": 0.2, "low": NAN, "high": 0.3, "n": 240, "over": over}
    control = {"concept_delta": ci, "ppl_ratio_median": 1.5, "composite": ci, "norm_ratio": 0.4}
    steer = steer_result()
    for r in steer["summary"]["rows"]:
        r |= {"concept_delta": ci, "composite": ci, "norm_ratio": 0.4, "ppl_ratio_median": 1.2,
              "controls": {"random_latent": control, "random_direction": control},
              "controlled": {"random_latent": ci}}
    steer = read_back(steer, tmp_path)
    plot_sweep(steer, tmp_path / "sweep.png")
    plot_by_layer({"dlm": {4: steer}, "ar": {4: steer}}, tmp_path / "layers.png")
    plot_tradeoff({"dlm": steer}, tmp_path / "tradeoff.png")
    for name in ("sweep.png", "layers.png", "tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
