"""Text sources: text files and Hugging Face datasets (files made here), EOS-joined and packed; the jobs' sources
add the embedded world."""
from __future__ import annotations

import json

import pytest
import torch

from dlmscope.data.text import PackedDocuments, read_documents, text_batches
from dlmscope.jobs.sources import token_batches
from dlmscope.world import TOKENIZER_DIR, load_tokenizer, token_rows


DOCS = [f"the {c} cat sat on the mat number {i}" for i, c in enumerate(["red", "blue", "green", "black"] * 10)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def _expected_stream(tokenizer, docs):
    eos = tokenizer.eos_token_id
    out = []
    for d in docs:
        out += tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
    return out


def _flatten(batches):
    return [int(t) for b in batches for row in b for t in row]


def _write_sources(tmp_path):
    """The same documents as a .txt, .jsonl, .parquet, .csv, a directory of jsonl files and a saved dataset."""
    datasets = pytest.importorskip("datasets")
    paths = {}
    paths["txt"] = tmp_path / "docs.txt"
    paths["txt"].write_text("\n".join(DOCS[:5]) + "\n\n   \n" + "\n".join(DOCS[5:]) + "\n")  # blank lines skipped
    paths["jsonl"] = tmp_path / "docs.jsonl"
    paths["jsonl"].write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    ds = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    paths["parquet"] = tmp_path / "docs.parquet"
    ds.to_parquet(str(paths["parquet"]))
    paths["csv"] = tmp_path / "docs.csv"
    ds.to_csv(str(paths["csv"]), index=False)
    paths["dir"] = tmp_path / "shards"
    paths["dir"].mkdir()
    half = len(DOCS) // 2
    for name, part in (("train-00000.jsonl", DOCS[:half]), ("train-00001.jsonl", DOCS[half:])):
        (paths["dir"] / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    paths["saved"] = tmp_path / "saved"
    ds.save_to_disk(str(paths["saved"]))
    return paths


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "csv", "dir", "saved"])
def test_every_source_kind_reads_the_documents_in_order(tmp_path, kind):
    paths = _write_sources(tmp_path)
    docs = read_documents(paths[kind])
    assert list(docs()) == DOCS
    assert list(docs()) == DOCS  # opened afresh on every call


def test_packing_is_eos_joined_contexts_with_every_tenth_document_held_out(tmp_path, tokenizer):
    paths = _write_sources(tmp_path)
    seq_len, lm_batch = 7, 3
    train, held = text_batches(paths["jsonl"], tokenizer, seq_len=seq_len, lm_batch=lm_batch)
    train_docs = [d for i, d in enumerate(DOCS) if i % 10]
    held_docs = [d for i, d in enumerate(DOCS) if i % 10 == 0]
    for batches, docs in ((train, train_docs), (held, held_docs)):
        got = list(batches)
        assert all(b.dtype == torch.long and b.shape[1] == seq_len and b.shape[0] <= lm_batch for b in got)
        assert all(b.shape[0] == lm_batch for b in got[:-1])
        stream = _expected_stream(tokenizer, docs)
        full = len(stream) // seq_len * seq_len
        assert _flatten(got) == stream[:full]  # the partial last context is dropped
        assert _flatten(list(batches)) == _flatten(got)  # re-iterable, same batches
    assert tokenizer.eos_token_id in _flatten(list(train))


def test_contexts_cross_document_boundaries_and_cap(tokenizer):
    docs = ["one two three four five six seven eight nine ten"] * 3
    packed = PackedDocuments(lambda: iter(docs), tokenizer, seq_len=4, lm_batch=2, part="all", max_contexts=5)
    rows = list(packed.contexts())
    assert len(rows) == 5
    assert [t for r in rows for t in r] == _expected_stream(tokenizer, docs)[:20]


def test_documents_are_read_lazily(tokenizer):
    """A huge (here: endless) source: a capped pass pulls only the documents it needs."""
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield f"document {i} says the sky is blue"
            i += 1

    packed = PackedDocuments(endless, tokenizer, seq_len=16, lm_batch=4, max_contexts=8)
    batches = list(packed)
    assert sum(b.shape[0] for b in batches) == 8
    assert len(pulled) < 2000  # read in tokenizer chunks, never whole


def test_world_source_is_the_world_split(tokenizer):
    train, held = token_batches("world", tokenizer, seq_len=32, lm_batch=8, world_sentences=2000, seed=3)
    ref_train, ref_held = token_rows(tokenizer, 2000, 32, 3)
    assert torch.equal(torch.cat(train), ref_train) and torch.equal(torch.cat(held), ref_held)


def test_the_library_reads_files_and_the_jobs_add_the_world(tmp_path, tokenizer):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS))
    args = {"seq_len": 8, "lm_batch": 2}
    files = [torch.cat(list(part)) for part in token_batches(tmp_path / "docs.txt", tokenizer, **args)]
    assert all(torch.equal(a, torch.cat(list(b)))
               for a, b in zip(files, text_batches(tmp_path / "docs.txt", tokenizer, **args)))
    with pytest.raises(ValueError, match=r"'world' does not exist \(expected a .txt file"):
        text_batches("world", tokenizer, **args)
    with pytest.raises(ValueError, match=r"'missing.txt' does not exist \(expected 'world' \(the embedded world's "
                                         r"corpus\), a .txt file"):
        token_batches("missing.txt", tokenizer, **args)


def test_bad_sources_name_the_problem(tmp_path, tokenizer):
    pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="does not exist"):
        read_documents(tmp_path / "missing.jsonl")
    (tmp_path / "x.docx").write_text("hi")
    with pytest.raises(ValueError, match="unknown text file kind '.docx'"):
        read_documents(tmp_path / "x.docx")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="no field 'text'.*--text-field"):
        list(read_documents(tmp_path / "rows.jsonl")())
    assert list(read_documents(tmp_path / "rows.jsonl", text_field="body")()) == ["hello"]
    (tmp_path / "nums.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match="not text"):
        list(read_documents(tmp_path / "nums.jsonl")())
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        PackedDocuments(lambda: iter(DOCS), tokenizer, seq_len=0, lm_batch=2)
    with pytest.raises(ValueError, match="part must be"):
        PackedDocuments(lambda: iter(DOCS), tokenizer, seq_len=4, lm_batch=2, part="test")
    with pytest.raises(ValueError, match="no tokenizer"):
        token_batches("world", None, seq_len=8, lm_batch=2)
    with pytest.raises(ValueError, match="no tokenizer"):
        text_batches(tmp_path / "rows.jsonl", None, seq_len=8, lm_batch=2)
