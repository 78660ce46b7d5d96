"""dlmscope.interp.neuronpedia: the Neuronpedia / SAEDashboard export of feature reports."""
from __future__ import annotations

import copy
import gzip
import json
from datetime import datetime

import pytest

from dlmscope.interp.neuronpedia import export_explanations, export_neuronpedia, source_id


def window(tokens, values, centre):
    return {"tokens": tokens, "values": values, "centre": centre}


def latent_entry(f, *, top=None, importance=None, interp=None):
    entry = {"latent": f, "frequency": 0.0123 + f * 1e-4, "n_fired": 2460, "max_act": 3.21,
             "histogram": {"edges": [0.0, 1.0, 2.0, 3.0, 4.0], "counts": [0, 5, 0, 2]},
             "top": top if top is not None else [window(["the", "capital", "is"], [0.0, 3.21, 0.5], 1),
                                                 window(["a", "city"], [0.25, 2.0], 1)],
             "importance": importance if importance is not None else [window(["x", "y", "z"], [0.0, 0.0, 0.7], 2),
                                                                       window(["u", "v"], [0.4, 0.0], 0)],
             "logits": {"promoted": [["paris", 1.2], ["rome", 0.8]], "suppressed": [["cat", -0.3], ["dog", -0.9]]},
             "masked": {"frequency": 0.5, "n_fired": 3, "max_act": 1.0, "top": [], "hidden_tokens": []}}
    if interp is not None:
        entry["interp"] = interp
    return entry


def make_report(latents=(17, 3), **kw):
    return {"model": "world-dlm", "layer": 4, "policy": "unmask", "n_latents": 512, "k": 8, "tokens_seen": 200000,
            "is_diffusion": True, "latents": {str(f): latent_entry(f, **kw) for f in latents}}


def read_batches(paths):
    return [json.loads(p.read_text(encoding="ascii")) for p in paths]   # valid, pure-ASCII JSON


def test_fields_map_one_to_one(tmp_path):
    report = make_report()
    paths = export_neuronpedia(report, tmp_path, model_id="world-dlm", sae_id="dlmscope-unmask-512")
    assert [p.name for p in paths] == ["batch-0.json"]
    (batch,) = read_batches(paths)
    assert batch["model_id"] == "world-dlm" and batch["layer"] == 4
    assert batch["sae_set"] == "dlmscope-unmask-512" and batch["sae_id_suffix"] is None
    feats = batch["features"]
    assert [ft["feature_index"] for ft in feats] == [3, 17]                 # sorted by latent id
    for ft in feats:
        e = report["latents"][str(ft["feature_index"])]
        assert ft["frac_nonzero"] == e["frequency"]
        assert ft["pos_str"] == ["paris", "rome"] and ft["pos_values"] == [1.2, 0.8]
        assert ft["neg_str"] == ["dog", "cat"] and ft["neg_values"] == [-0.9, -0.3]   # most negative first
        assert ft["freq_hist_data_bar_values"] == [1.5, 2.5, 3.5]       # bin centres, outer empty bins dropped
        assert ft["freq_hist_data_bar_heights"] == [5, 0, 2]
        top, imp = ft["activations"][:2], ft["activations"][2:]
        for act, w in zip(top, e["top"]):
            assert act["tokens"] == w["tokens"] and act["values"] == w["values"]
            assert act["qualifying_token_index"] == w["centre"]
            assert (act["bin_min"], act["bin_max"], act["bin_contains"]) == (-1, 3.21, -1)
        for act, w in zip(imp, e["importance"]):
            assert act["tokens"] == w["tokens"] and act["values"] == w["values"]
            assert (act["bin_min"], act["bin_max"], act["bin_contains"]) == (0.4, 0.7, -1)
        # every key SAEDashboard's batch files carry (and the Neuronpedia converters read), placeholders empty
        for key in ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist", "vector"):
            assert ft[key] == [], key
        assert (ft["n_prompts_total"], ft["n_tokens_in_prompt"], ft["dataset"]) == (0, 0, "")
    settings = json.loads((tmp_path / "run_settings.json").read_text())
    assert settings["source_id"] == "4-dlmscope-unmask-512" and settings["n_features"] == 2
    assert settings["dlmscope_report"]["is_diffusion"] is True
    assert "masked" not in json.dumps(batch)                              # DLM-only statistics are not exported


# the keys Neuronpedia's convert-saedashboard-to-neuronpedia-export.py and SAEDashboard's neuronpedia_export.py read
# with [...] (a missing one is a KeyError there)
CONVERTER_BATCH_KEYS = {"model_id", "layer", "sae_id_suffix", "features"}
CONVERTER_FEATURE_KEYS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1", "correlated_features_indices",
    "correlated_features_pearson", "correlated_features_l1", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "decoder_weights_dist", "activations"}
CONVERTER_ACTIVATION_KEYS = {"tokens", "values", "bin_contains", "bin_max", "bin_min", "qualifying_token_index"}


def test_batch_files_carry_every_key_the_neuronpedia_converters_read(tmp_path):
    (batch,) = read_batches(export_neuronpedia(make_report(), tmp_path, model_id="m", sae_id="s"))
    assert CONVERTER_BATCH_KEYS <= set(batch) and "sae_set" in batch
    for ft in batch["features"]:
        assert CONVERTER_FEATURE_KEYS <= set(ft)
        assert all(isinstance(ft[k], list) for k in CONVERTER_FEATURE_KEYS - {"feature_index", "frac_nonzero"})
        for act in ft["activations"]:
            assert CONVERTER_ACTIVATION_KEYS <= set(act)
            assert act["values"], "the converters take max(values): a window is never empty"


def test_options(tmp_path):
    report = make_report(latents=(5,))
    (path,) = export_neuronpedia(report, tmp_path, model_id="m", sae_id="s", sae_id_suffix="l0-8", dataset="world",
                                 n_prompts_total=100, n_tokens_in_prompt=21, include_importance=False,
                                 token_text=str.upper)
    (ft,) = json.loads(path.read_text())["features"]
    assert len(ft["activations"]) == 2 and ft["activations"][0]["tokens"] == ["THE", "CAPITAL", "IS"]
    assert ft["pos_str"] == ["PARIS", "ROME"]
    assert (ft["n_prompts_total"], ft["n_tokens_in_prompt"], ft["dataset"]) == (100, 21, "world")
    assert json.loads(path.read_text())["sae_id_suffix"] == "l0-8"
    assert source_id(4, "s", "l0-8") == "4-s__l0-8" and source_id(0, "s") == "0-s"


def test_missing_optional_parts_give_neutral_values(tmp_path):
    report = make_report(latents=(1,))
    e = report["latents"]["1"]
    for key in ("histogram", "logits", "importance", "top", "max_act"):
        del e[key]
    (path,) = export_neuronpedia(report, tmp_path, model_id="m", sae_id="s")
    (ft,) = json.loads(path.read_text())["features"]
    assert ft["activations"] == [] and ft["pos_str"] == [] and ft["neg_values"] == []
    assert ft["freq_hist_data_bar_values"] == [] and ft["freq_hist_data_bar_heights"] == []


def test_batching(tmp_path):
    report = make_report(latents=range(10))
    paths = export_neuronpedia(report, tmp_path / "out", model_id="m", sae_id="s", batch_size=4)
    assert [p.name for p in paths] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    batches = read_batches(paths)
    assert [[ft["feature_index"] for ft in b["features"]] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b["layer"] == 4 and b["model_id"] == "m" for b in batches)
    # a second export refuses to mix with the first, and with overwrite leaves no stale batch behind
    with pytest.raises(FileExistsError, match="overwrite"):
        export_neuronpedia(report, tmp_path / "out", model_id="m", sae_id="s")
    paths = export_neuronpedia(report, tmp_path / "out", model_id="m", sae_id="s", batch_size=128, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("batch-*.json")) == ["batch-0.json"]
    assert len(read_batches(paths)[0]["features"]) == 10


def test_escaping_and_unicode_tokens_survive(tmp_path):
    tokens = ['"quoted"', "back\\slash", "new\nline", "tab\t", "Ġspace", "▁piece", "日本語", "emoji 🧪", "</script>",
              "\u0000nul", "\u2028"]
    report = make_report(latents=(2,), top=[window(tokens, [0.0] * (len(tokens) - 1) + [1.0], len(tokens) - 1)],
                         importance=[])
    report["latents"]["2"]["logits"]["promoted"] = [["ü\"ber", 1.0], ["🧪", 0.5]]
    (path,) = export_neuronpedia(report, tmp_path, model_id="m", sae_id="s")
    raw = path.read_bytes()
    assert raw.isascii()                                                   # \u escapes, as SAEDashboard writes
    (ft,) = json.loads(raw)["features"]
    assert ft["activations"][0]["tokens"] == tokens
    assert ft["pos_str"] == ["ü\"ber", "🧪"]


def test_export_does_not_change_the_report(tmp_path):
    report = make_report()
    before = copy.deepcopy(report)
    export_neuronpedia(report, tmp_path, model_id="m", sae_id="s")
    assert report == before


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.pop("latents"), "'latents' mapping"),
    (lambda r: r.update(layer=-1), "'layer' must be an int"),
    (lambda r: r.update(latents={}), "no latents"),
    (lambda r: r["latents"].update({"x": {}}), "latent id string"),
    (lambda r: r["latents"]["17"].update(latent=18), "says latent 18"),
    (lambda r: r["latents"]["17"].pop("frequency"), "frequency must be a finite number"),
    (lambda r: r["latents"]["17"].update(frequency=1.5), r"fraction in \[0, 1\]"),
    (lambda r: r["latents"]["17"]["top"][0].update(values=[1.0]), "as long as its tokens"),
    (lambda r: r["latents"]["17"]["top"][0].update(centre=3), r"centre must be a token index in \[0, 3\)"),
    (lambda r: r["latents"]["17"]["top"][0].update(tokens=[1, 2, 3]), "list of strings"),
    (lambda r: r["latents"]["17"]["top"][0]["values"].__setitem__(0, float("nan")), "finite number"),
    (lambda r: r["latents"]["17"]["importance"].__setitem__(0, "window"), r"importance\[0\].tokens"),
    (lambda r: r["latents"]["17"]["logits"].update(promoted=[["a", 1.0, 2.0]]), r"\[token, value\] pair"),
    (lambda r: r["latents"]["17"]["logits"].update(suppressed=[["a", float("inf")]]), "finite number"),
    (lambda r: r["latents"]["17"]["histogram"].update(counts=[1, 2]), r"'edges' \[B\+1\]"),
    (lambda r: r["latents"]["17"]["histogram"].update(counts=[1, -2, 0, 0]), "counts be >= 0"),
])
def test_bad_reports_raise_before_writing(tmp_path, mutate, match):
    report = make_report()
    mutate(report)
    with pytest.raises(ValueError, match=match):
        export_neuronpedia(report, tmp_path / "out", model_id="m", sae_id="s")
    assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path):
    report = make_report()
    with pytest.raises(ValueError, match="bad report"):
        export_neuronpedia([], tmp_path, model_id="m", sae_id="s")
    for kw in ({"model_id": "my model"}, {"sae_id": ""}, {"sae_id": "a/b"}, {"sae_id_suffix": "x y"}):
        args = {"model_id": "m", "sae_id": "s", **kw}
        with pytest.raises(ValueError, match="Neuronpedia id"):
            export_neuronpedia(report, tmp_path, **args)
    for bs in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            export_neuronpedia(report, tmp_path, model_id="m", sae_id="s", batch_size=bs)
    with pytest.raises(ValueError, match="n_prompts_total"):
        export_neuronpedia(report, tmp_path, model_id="m", sae_id="s", n_prompts_total=-1)


# ---- explanations ------------------------------------------------------------------------------------------------


NEURONPEDIA_EXPLANATION_FIELDS = ["id", "modelId", "layer", "index", "description", "authorId", "embedding",
                                  "triggeredById", "typeName", "explanationModelName", "notes", "createdAt"]


@pytest.mark.parametrize("name", ["batch-0.jsonl", "batch-0.jsonl.gz"])
def test_explanations(tmp_path, name):
    report = make_report(latents=(3, 9, 17))
    report["latents"]["17"]["interp"] = {"explanation": "capital cities «é»\n", "accuracy": 0.86, "judge": "planted"}
    report["latents"]["3"]["interp"] = {"explanation": "animals", "explainer": "gpt-x"}
    when = datetime(2026, 1, 2, 3, 4, 5)
    path = export_explanations(report, tmp_path / "explanations" / name, model_id="world-dlm", sae_id="dlmscope",
                               author_id="user1", created_at=when)
    data = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    rows = [json.loads(line) for line in data.decode("ascii").splitlines()]
    assert [r["index"] for r in rows] == ["3", "17"]                        # latent 9 has no explanation
    for r in rows:
        assert list(r) == NEURONPEDIA_EXPLANATION_FIELDS
        assert r["modelId"] == "world-dlm" and r["layer"] == "4-dlmscope" and r["authorId"] == "user1"
        assert r["createdAt"] == "2026-01-02T03:04:05" and r["typeName"] == "dlmscope"
        assert len(r["id"]) == 25 and r["id"].startswith("c")
    assert rows[1]["description"] == "capital cities «é»"
    assert rows[1]["notes"] == "detection accuracy 0.86; judge: planted" and rows[1]["explanationModelName"] is None
    assert rows[0]["explanationModelName"] == "gpt-x" and rows[0]["notes"] is None
    again = export_explanations(report, tmp_path / "again.jsonl", model_id="world-dlm", sae_id="dlmscope",
                                created_at=when)
    assert [json.loads(x)["id"] for x in again.read_text().splitlines()] == [r["id"] for r in rows]  # deterministic


def test_explanations_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no latent has interp.explanation"):
        export_explanations(make_report(), tmp_path / "e.jsonl", model_id="m", sae_id="s")
    report = make_report(interp={"explanation": "  ", "accuracy": 0.5})
    with pytest.raises(ValueError, match="non-empty string"):
        export_explanations(report, tmp_path / "e.jsonl", model_id="m", sae_id="s")
    report = make_report(interp={"explanation": "x", "accuracy": float("nan")})
    with pytest.raises(ValueError, match="accuracy must be a finite number"):
        export_explanations(report, tmp_path / "e.jsonl", model_id="m", sae_id="s")
    assert not (tmp_path / "e.jsonl").exists()


def test_21_19_gzipped_explanations_are_written_durably_with_a_temp_name_of_their_own(tmp_path):
    report = make_report(latents=(3,))
    report["latents"]["3"]["interp"] = {"explanation": "animals"}
    stale = tmp_path / ".batch-0.jsonl.gz.tmp"  # another writer's temp file, by the name a fixed scheme would pick
    stale.write_bytes(b"another writer's bytes")
    path = export_explanations(report, tmp_path / "batch-0.jsonl.gz", model_id="m", sae_id="s")
    assert stale.read_bytes() == b"another writer's bytes"
    assert json.loads(gzip.decompress(path.read_bytes()))["description"] == "animals"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".batch-0.jsonl.gz.tmp", "batch-0.jsonl.gz"]
