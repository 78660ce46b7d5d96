"""dlmscope.interp.report: one validator for the feature report, so the dashboard and the Neuronpedia export reject
the same problems with the same message; each reader requires only what it cannot do without."""
from __future__ import annotations

import pytest

from dlmscope.interp.dashboard import REQUIRE_ENTRY, write_dashboard
from dlmscope.interp.neuronpedia import export_explanations, export_neuronpedia
from dlmscope.interp.report import validate_report


def _window(tokens, values, centre):
    return {"tokens": list(tokens), "values": list(values), "centre": centre}


def _report(*, dlm: bool = True) -> dict:
    entry = {"latent": 7, "frequency": 0.01, "n_fired": 20, "max_act": 2.0,
             "histogram": {"edges": [0.5, 1.0, 2.0], "counts": [3, 1]},
             "top": [_window(["a", "b", "c"], [0.0, 2.0, 0.5], 1)], "importance": [_window(["d", "e"], [1.0, 0.0], 0)],
             "logits": {"promoted": [["x", 1.0]], "suppressed": [["y", -1.0]]},
             "interp": {"explanation": "letters", "accuracy": 0.8, "judge": "planted"},
             "concept": {"name": "food", "f1": 0.5}}
    if dlm:
        entry["masked"] = {"frequency": 0.02, "n_fired": 3, "max_act": 1.0,
                           "top": [_window(["a", "[MASK]"], [0.0, 1.0], 1) | {"hidden": "b"}],
                           "hidden_tokens": [["b", 1]]}
    return {"model": "m", "layer": 2, "is_diffusion": dlm, "latents": {"7": entry}}


def _readers(tmp_path):
    """Every reader of a report, each writing into its own folder of ``tmp_path``."""
    return {"dashboard": lambda r: write_dashboard(r, tmp_path / "site"),
            "neuronpedia": lambda r: export_neuronpedia(r, tmp_path / "np", model_id="m", sae_id="s"),
            "explanations": lambda r: export_explanations(r, tmp_path / "e.jsonl", model_id="m", sae_id="s")}


def test_a_good_report_passes_every_reader(tmp_path):
    validate_report(_report())
    for read in _readers(tmp_path).values():
        read(_report())
    for read in _readers(tmp_path / "ar").values():
        read(_report(dlm=False))


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(max_act=float("nan")), r"latent 7: max_act must be a finite number, got nan"),
    (lambda e: e.update(frequency=1.5), r"latent 7: frequency must be a fraction in \[0, 1\], got 1.5"),
    (lambda e: e["top"][0].update(tokens=["a", 2, "c"]), r"latent 7: top\[0\].tokens must be a list of strings"),
    (lambda e: e["top"][0].pop("centre"), r"latent 7: top\[0\]: centre None is not a position of its 3 tokens"),
    (lambda e: e["importance"][0]["values"].__setitem__(1, float("inf")),
     r"latent 7: importance\[0\].values\[1\] must be a finite number, got inf"),
    (lambda e: e["histogram"].update(edges=[0.5, 2.0, 1.0]), "latent 7: histogram edges must increase"),
    (lambda e: e["logits"].update(promoted=[[3, 1.0]]), r"latent 7: logits.promoted\[0\] must be a \[token, value\]"),
    (lambda e: e["masked"].update(frequency=float("nan")), "latent 7: masked.frequency must be a finite number"),
    (lambda e: e["masked"].update(hidden_tokens=[["b", None]]),
     r"latent 7: masked.hidden_tokens\[0\]\[1\] must be a finite number"),
    (lambda e: e["interp"].update(accuracy=float("nan")), "latent 7: interp.accuracy must be a finite number"),
    (lambda e: e["interp"].update(explanation=3), "latent 7: interp.explanation must be a string"),
    (lambda e: e.update(concept="food"), "latent 7: concept must be a dict, got str"),
])
def test_every_reader_rejects_the_same_problem_with_the_same_message(tmp_path, change, message):
    report = _report()
    change(report["latents"]["7"])
    with pytest.raises(ValueError, match="^bad report: " + message):
        validate_report(report)
    for read in _readers(tmp_path).values():
        with pytest.raises(ValueError, match="^bad report: " + message):
            read(report)
    assert not list(tmp_path.iterdir()), "a bad report is rejected before anything is written"


def test_a_masked_section_needs_a_diffusion_report(tmp_path):
    report = _report()
    report["is_diffusion"] = False
    for read in _readers(tmp_path).values():
        with pytest.raises(ValueError, match="latent 7: has a 'masked' section, but the report is not for a diffusion"):
            read(report)


def test_each_reader_requires_only_what_it_needs(tmp_path):
    no_top = _report()
    del no_top["latents"]["7"]["top"]
    validate_report(no_top)
    with pytest.raises(ValueError, match="latent 7: entry has no 'top' windows"):
        validate_report(no_top, require_entry=REQUIRE_ENTRY)
    with pytest.raises(ValueError, match="latent 7: entry has no 'top' windows"):
        write_dashboard(no_top, tmp_path / "site")
    export_neuronpedia(no_top, tmp_path / "np", model_id="m", sae_id="s")      # the export needs no windows

    no_frequency, no_layer = _report(), _report()
    del no_frequency["latents"]["7"]["frequency"]
    del no_layer["layer"]
    write_dashboard(no_frequency, tmp_path / "site")
    write_dashboard(no_layer, tmp_path / "site2")
    with pytest.raises(ValueError, match="latent 7: frequency must be a finite number, got None"):
        export_neuronpedia(no_frequency, tmp_path / "np2", model_id="m", sae_id="s")
    with pytest.raises(ValueError, match="'layer' must be an int >= 0, got None"):
        export_neuronpedia(no_layer, tmp_path / "np2", model_id="m", sae_id="s")
    with pytest.raises(TypeError, match=r"cannot require \['hidden_tokens'\]"):
        validate_report(_report(), require_entry=("hidden_tokens",))
