"""Where the harvesting text comes from: a text file or a Hugging Face dataset.

Real corpora are handled the way the paper does it (docs/reference.md §2): documents are tokenized without special
tokens, joined with the EOS token (each document followed by one EOS) and the token stream is cut into
fixed-length contexts of ``seq_len`` (a partial last context is dropped). Documents are read lazily — a text
file line by line, a dataset through ``datasets``' streaming mode — so a corpus is never loaded whole; the
harvest stops pulling as soon as it has its tokens.

Train / held-out split: document ``i`` (0-based, in source order) is held out when ``i % heldout_every == 0``,
which needs no pass over the corpus and is the same however far it is read.

    train, held = text_batches("corpus.jsonl", tokenizer, seq_len=2048, lm_batch=8)   # re-iterable [8, 2048]

A source is a ``.txt`` file (one document per non-empty line), a data file ``.jsonl`` / ``.json`` / ``.parquet`` /
``.csv``, a directory of such files, or a directory written by ``datasets.Dataset.save_to_disk``.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DATA_SUFFIXES", "SOURCE_KINDS", "text_batches", "PackedDocuments", "read_documents", "require_tokenizer"]

#: data-file suffixes read through ``datasets`` (the builder that reads them)
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: the sources :func:`text_batches` reads, as error messages name them
SOURCE_KINDS = f"a .txt file, a data file {sorted(DATA_SUFFIXES)} or a dataset directory"
_TOKENIZE_CHUNK = 256  # documents per tokenizer call (fast tokenizers batch them)


def _text_file_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def _dataset_documents(path: Path, text_field: str, split: str) -> Iterator[str]:
    try:
        import datasets  # optional dependency (pip install "dlmscope[data]"), imported only for dataset sources
    except ImportError as exc:
        raise ValueError(f"reading {path} needs the `datasets` library: pip install datasets") from exc
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow files, read lazily below
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        rows = ds.to_iterable_dataset()
    elif path.is_dir():
        rows = datasets.load_dataset(str(path), split=split, streaming=True)
    else:
        rows = datasets.load_dataset(DATA_SUFFIXES[path.suffix.lower()], data_files=str(path), split=split,
                                     streaming=True)
    for i, row in enumerate(rows):
        if text_field not in row:
            raise ValueError(f"{path}: row {i} has no field {text_field!r} (fields: {sorted(row)}); "
                             "pass text_field=... (CLI: --text-field)")
        text = row[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {i} field {text_field!r} is a {type(text).__name__}, not text")
        if text.strip():
            yield text


def read_documents(source: str | os.PathLike, *, text_field: str = "text", split: str = "train"
                   ) -> Callable[[], Iterator[str]]:
    """A function that opens ``source`` afresh and yields its documents (non-empty strings) lazily.

    Validates ``source`` now (exists, a known kind) so a typo fails before any model work.
    """
    path = Path(source)
    if not path.exists():
        raise ValueError(f"text source {os.fspath(source)!r} does not exist (expected {SOURCE_KINDS})")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return lambda: _text_file_documents(path)
        if suffix not in DATA_SUFFIXES:
            raise ValueError(f"{path}: unknown text file kind {suffix!r}; expected .txt (one document per line) "
                             f"or one of {sorted(DATA_SUFFIXES)}")
    return lambda: _dataset_documents(path, text_field, split)


class PackedDocuments:
    """Re-iterable ``[lm_batch, seq_len]`` int64 batches of EOS-joined documents packed into contexts.

    ``documents()`` opens the source afresh on every pass. ``part`` selects ``"train"`` (documents with
    ``i % heldout_every != 0``), ``"heldout"`` (the others) or ``"all"``. ``max_contexts`` caps a pass.
    """

    def __init__(self, documents: Callable[[], Iterable[str]], tokenizer, seq_len: int, lm_batch: int, *,
                 part: str = "train", heldout_every: int = 10, max_contexts: int | None = None):
        if part not in ("train", "heldout", "all"):
            raise ValueError(f"part must be 'train', 'heldout' or 'all', got {part!r}")
        for name, value in (("seq_len", seq_len), ("lm_batch", lm_batch), ("heldout_every", heldout_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if heldout_every < 2 and part != "all":
            raise ValueError("heldout_every must be >= 2 to leave documents for both parts")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to join documents with")
        self.documents, self.tokenizer = documents, tokenizer
        self.seq_len, self.lm_batch = seq_len, lm_batch
        self.part, self.heldout_every, self.max_contexts = part, heldout_every, max_contexts

    def _selected(self) -> Iterator[str]:
        for i, doc in enumerate(self.documents()):
            held = i % self.heldout_every == 0
            if self.part == "all" or held == (self.part == "heldout"):
                yield doc

    def contexts(self) -> Iterator[list[int]]:
        """Token-id lists of length ``seq_len``: the EOS-joined token stream cut into contexts."""
        eos, stream, made = int(self.tokenizer.eos_token_id), [], 0
        docs = self._selected()
        while chunk := list(itertools.islice(docs, _TOKENIZE_CHUNK)):
            for ids in self.tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                stream.extend(ids)
                stream.append(eos)
            start = 0
            while len(stream) - start >= self.seq_len:
                yield stream[start:start + self.seq_len]
                start += self.seq_len
                made += 1
                if self.max_contexts is not None and made >= self.max_contexts:
                    return
            del stream[:start]

    def __iter__(self) -> Iterator[Tensor]:
        batch: list[list[int]] = []
        for ctx in self.contexts():
            batch.append(ctx)
            if len(batch) == self.lm_batch:
                yield torch.tensor(batch, dtype=torch.long)
                batch = []
        if batch:
            yield torch.tensor(batch, dtype=torch.long)


def require_tokenizer(tokenizer) -> None:
    """Raise ``ValueError`` when a model came without a tokenizer (text cannot become token ids)."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer files next to its weights; cannot tokenize text")


def text_batches(source: str | os.PathLike, tokenizer, *, seq_len: int, lm_batch: int, text_field: str = "text",
                 split: str = "train", heldout_every: int = 10) -> tuple[Iterable[Tensor], Iterable[Tensor]]:
    """``(train, heldout)`` re-iterables of ``[lm_batch, seq_len]`` token batches from ``source`` (see the
    module docstring)."""
    require_tokenizer(tokenizer)
    docs = read_documents(source, text_field=text_field, split=split)
    return tuple(PackedDocuments(docs, tokenizer, seq_len, lm_batch, part=part, heldout_every=heldout_every)
                 for part in ("train", "heldout"))
