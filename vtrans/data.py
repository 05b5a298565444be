"""Text data for pruning and evaluation: load documents, split them without leakage, and tokenise them.

Language-model data becomes fixed-length token blocks; classification data becomes padded tensors.
"""
from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Label = Union[int, float, None]

LABEL_PREFIX = "__label__"
TEXT_SUFFIXES = (".txt",)
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}
ACCEPTED_SOURCES = (
    "gensim:<file name in gensim's test data>, "
    "a local .txt (one document per line), .jsonl, .json, .csv or .tsv file, "
    "or hf:<dataset>[:<config>]:<split>"
)
OFFLINE_HINT = (
    " Offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): download the dataset once with network "
    "access so it is cached."
)
_HF_SOURCE = re.compile(r"^(?P<name>[^:]+?)(?::(?P<config>[^:\[\]]+))?:(?P<split>[^:\[\]]+(?:\[[^\]]*\])?)$")


@dataclass(frozen=True)
class Document:
    """One unit of text: splits never cut a document; `text_pair` holds the second sentence of pair tasks."""

    text: str
    label: Label = None
    text_pair: str | None = None


class Corpus(list):
    """A list of documents that remembers its source and, for categorical labels, the label names.

    `label_names[i]` is the original name of integer label `i` (names are numbered in sorted order).
    """

    def __init__(self, docs: Sequence[Document], source: str, label_names: tuple[str, ...] | None = None):
        super().__init__(docs)
        self.source = source
        self.label_names = label_names

    def label_ids(self) -> dict[str, int] | None:
        """The mapping label name -> integer label, or None when labels were not named."""
        return None if self.label_names is None else {n: i for i, n in enumerate(self.label_names)}


# ----------------------------------------------------------------------------------------- loading


def load_documents(
    source: str,
    text_field: str | Sequence[str] = "text",
    label_field: str | None = "label",
    limit: int | None = None,
) -> Corpus:
    """Load documents from `source` (see ACCEPTED_SOURCES); return a `Corpus` (a list of `Document`).

    For tabular sources `text_field` names the text column, or two columns ("sentence1,sentence2" or a
    pair) for sentence-pair tasks. The default `label_field` "label" is optional (documents without
    it get label None); any other label field must exist. String labels are numbered in sorted order.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of documents or None, got {limit}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string; accepted: {ACCEPTED_SOURCES}")
    if source.startswith("gensim:"):
        corpus = _load_gensim(source[len("gensim:"):], source)
    elif source.startswith("hf:"):
        corpus = _load_hf(source[len("hf:"):], source, text_field, label_field, limit)
    else:
        corpus = _load_local(source, text_field, label_field, limit)
    if limit is not None and len(corpus) > limit:
        corpus = Corpus(corpus[:limit], corpus.source, corpus.label_names)
    if not corpus:
        raise ValueError(f"source {source!r} contains no documents")
    logger.info("loaded %d documents from %s", len(corpus), source)
    return corpus


def _load_gensim(name: str, source: str) -> Corpus:
    logging.getLogger("gensim").setLevel(logging.WARNING)  # its test utilities log a dictionary build at import
    try:
        from gensim.test.utils import datapath
    except ImportError as exc:
        raise ValueError(
            f"source {source!r} needs the gensim package, which is not installed (pip install gensim); "
            f"other accepted sources: {ACCEPTED_SOURCES}"
        ) from exc
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"source {source!r}: expected gensim:<file name>, e.g. gensim:lee_background.cor")
    path = Path(datapath(name))
    if not path.is_file():
        available = sorted(p.name for p in path.parent.iterdir() if p.suffix in (".cor", ".txt"))
        raise FileNotFoundError(
            f"gensim test data has no file {name!r} (looked in {path.parent}); available text files: "
            f"{', '.join(available)}"
        )
    return _text_lines_corpus(path, source)


def _load_local(
    source: str, text_field: str | Sequence[str], label_field: str | None, limit: int | None
) -> Corpus:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", source) and not Path(source).exists():
        raise ValueError(f"unknown source scheme in {source!r}; accepted: {ACCEPTED_SOURCES}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES and suffix not in DATASET_SUFFIXES:
        accepted = ", ".join((*TEXT_SUFFIXES, *DATASET_SUFFIXES))
        kind = suffix or "(none)"
        raise ValueError(f"unsupported file type {kind!r} for {source!r}; accepted file types: {accepted}")
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {str(path)!r} does not exist; accepted sources: {ACCEPTED_SOURCES}"
        )
    if suffix in TEXT_SUFFIXES:
        return _text_lines_corpus(path, source)
    import datasets

    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    ds = datasets.load_dataset(DATASET_SUFFIXES[suffix], data_files=str(path), split="train", **kwargs)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _dataset_corpus(ds, source, text_field, label_field)


def _load_hf(
    spec: str, source: str, text_field: str | Sequence[str], label_field: str | None, limit: int | None
) -> Corpus:
    match = _HF_SOURCE.match(spec)
    if match is None:
        raise ValueError(
            f"bad Hugging Face source {source!r}; expected hf:<dataset>[:<config>]:<split>, "
            "e.g. hf:glue:sst2:validation"
        )
    name, config, split = match["name"], match["config"], match["split"]
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing cache, bad config or split: all reported the same way
        offline = OFFLINE_HINT if datasets.config.HF_HUB_OFFLINE else ""
        raise ValueError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(exc).__name__}: {exc}.{offline}"
        ) from exc
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _dataset_corpus(ds, source, text_field, label_field)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.debug("%s is not UTF-8; decoding as latin-1", path)
        return raw.decode("latin-1")


def _text_lines_corpus(path: Path, source: str) -> Corpus:
    """One document per non-empty line; fastText-style `__label__X` prefixes become labels."""
    lines = [line.strip() for line in _read_text(path).splitlines()]
    lines = [line for line in lines if line]
    labelled = [line.startswith(LABEL_PREFIX) for line in lines]
    if not any(labelled):
        return Corpus([Document(line) for line in lines], source)
    if not all(labelled):
        first = labelled.index(False)
        raise ValueError(
            f"{source!r}: line {first + 1} has no {LABEL_PREFIX} prefix while others do: "
            f"{lines[first][:80]!r}"
        )
    pairs = [_split_label(line, source) for line in lines]
    names = tuple(sorted({name for name, _ in pairs}))
    ids = {n: i for i, n in enumerate(names)}
    return Corpus([Document(text, ids[name]) for name, text in pairs], source, names)


def _split_label(line: str, source: str) -> tuple[str, str]:
    head, _, text = line.partition(" ")
    name = head[len(LABEL_PREFIX):]
    if not name or not text.strip():
        raise ValueError(
            f"{source!r}: malformed labelled line {line[:80]!r}; expected '{LABEL_PREFIX}<name> <text>'"
        )
    return name, text.strip()


def _text_fields(text_field: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(text_field, str):
        fields = tuple(f.strip() for f in text_field.split(","))
    else:
        fields = tuple(text_field)
    if not 1 <= len(fields) <= 2 or not all(fields):
        raise ValueError(f"text_field must name one column or two (a sentence pair), got {text_field!r}")
    return fields


def _dataset_corpus(ds, source: str, text_field: str | Sequence[str], label_field: str | None) -> Corpus:
    """Turn a `datasets.Dataset` into documents, checking that the requested columns exist."""
    columns = list(ds.column_names)
    fields = _text_fields(text_field)
    for field in fields:
        if field not in columns:
            raise ValueError(f"{source!r} has no text field {field!r}; available fields: {columns}")
    if label_field is not None and label_field not in columns:
        if label_field != "label":
            raise ValueError(f"{source!r} has no label field {label_field!r}; available fields: {columns}")
        label_field = None
    texts = [ds[f] for f in fields]
    pairs = texts[1] if len(fields) == 2 else [None] * len(texts[0])
    raw_labels = ds[label_field] if label_field is not None else [None] * len(texts[0])
    feature_names = getattr(ds.features.get(label_field), "names", None) if label_field else None
    labels, names = _normalise_labels(raw_labels, feature_names, source)
    docs = [
        Document(_as_text(t, source), lab, None if p is None else _as_text(p, source))
        for t, p, lab in zip(texts[0], pairs, labels)
    ]
    return Corpus(docs, source, names)


def _as_text(value, source: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{source!r}: text values must be strings, got {type(value).__name__}: {value!r}")
    return value


def _normalise_labels(
    raw: list, feature_names: list[str] | None, source: str
) -> tuple[list[Label], tuple[str, ...] | None]:
    """Numbers stay numbers (bool -> int, ClassLabel -1 -> None); strings are numbered in sorted order."""
    if feature_names is not None:
        return [None if v is None or v < 0 else int(v) for v in raw], tuple(feature_names)
    present = [v for v in raw if v is not None]
    if all(isinstance(v, str) for v in present) and present:
        names = tuple(sorted(set(present)))
        ids = {n: i for i, n in enumerate(names)}
        return [None if v is None else ids[v] for v in raw], names
    if not all(isinstance(v, (int, float, bool)) for v in present):
        kinds = sorted({type(v).__name__ for v in present})
        raise ValueError(f"{source!r}: labels must be all numbers or all strings, got types {kinds}")
    return [None if v is None else (int(v) if isinstance(v, bool) else v) for v in raw], None


# ----------------------------------------------------------------------------------------- splits


def _text_groups(docs: Sequence[Document]) -> list[list[int]]:
    """Indices of identical documents (same text and pair), in order of first occurrence."""
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i, doc in enumerate(docs):
        groups.setdefault((doc.text, doc.text_pair), []).append(i)
    return list(groups.values())


def _pick(docs: Sequence[Document], indices: Sequence[int]) -> list[Document]:
    return [docs[i] for i in sorted(indices)]


def split_documents(
    docs: Sequence[Document], heldout_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split into (train, heldout) at document level, deterministically for a given seed.

    Identical documents always land in the same part, so held-out text never appears in training.
    The held-out part gets round(len(docs) * heldout_fraction) documents; both parts keep source order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction}")
    target = round(len(docs) * heldout_fraction)
    if target < 1 or target >= len(docs):
        raise ValueError(
            f"splitting {len(docs)} documents with heldout_fraction={heldout_fraction} leaves an empty part "
            f"({target} held out); use more documents or a different fraction"
        )
    groups = _text_groups(docs)
    random.Random(seed).shuffle(groups)
    heldout: list[int] = []
    for group in groups:
        if len(heldout) + len(group) <= target:
            heldout.extend(group)
        if len(heldout) == target:
            break
    held = set(heldout)
    train = [i for i in range(len(docs)) if i not in held]
    if not heldout or not train:
        raise ValueError(
            f"cannot split {len(docs)} documents ({len(groups)} distinct) into two non-empty parts"
        )
    return _pick(docs, train), _pick(docs, heldout)


def subsample(docs: Sequence[Document], fraction: float, seed: int) -> list[Document]:
    """A deterministic random subset of round(len(docs) * fraction) documents (at least one), in order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not docs:
        raise ValueError("cannot subsample an empty list of documents")
    n = max(1, round(len(docs) * fraction))
    return _pick(docs, random.Random(seed).sample(range(len(docs)), n))


def kfold(docs: Sequence[Document], k: int, fold: int, seed: int) -> tuple[list[Document], list[Document]]:
    """The (train, validation) documents of fold `fold` of a k-fold split, deterministic for a given seed.

    Validation folds are disjoint and cover all documents; identical documents share a fold. With
    integer labels the folds are stratified (each fold gets about the same share of every label).
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in [0, {k}), got {fold}")
    groups = _text_groups(docs)
    if len(groups) < k:
        raise ValueError(f"cannot make {k} folds from {len(groups)} distinct documents")
    assignment = _assign_folds(docs, groups, k, seed)
    val = [i for g, f in zip(groups, assignment) if f == fold for i in g]
    train = [i for g, f in zip(groups, assignment) if f != fold for i in g]
    return _pick(docs, train), _pick(docs, val)


def _assign_folds(docs: Sequence[Document], groups: list[list[int]], k: int, seed: int) -> list[int]:
    """Deal shuffled groups, label by label, to the fold with fewest of that label (then fewest overall)."""
    labels = [docs[g[0]].label for g in groups]
    stratify = all(isinstance(lab, int) and not isinstance(lab, bool) for lab in labels)
    keys = labels if stratify else [0] * len(groups)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    per_label: dict = {}
    totals = [0] * k
    assignment = [0] * len(groups)
    for key in sorted(set(keys)):
        counts = per_label.setdefault(key, [0] * k)
        for gi in (g for g in order if keys[g] == key):
            f = min(range(k), key=lambda j: (counts[j], totals[j], j))
            assignment[gi] = f
            counts[f] += len(groups[gi])
            totals[f] += len(groups[gi])
    if len(set(assignment)) < k:
        raise ValueError(f"cannot make {k} non-empty folds from {len(groups)} distinct documents")
    return assignment


# ----------------------------------------------------------------------------------------- tokenising


def _texts(docs: Sequence[Document | str]) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in docs]


def lm_blocks(
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document | str],
    seq_len: int,
    max_blocks: int | None = None,
) -> torch.Tensor:
    """Tokenise documents into one stream (joined by the EOS, else SEP, token) cut into full blocks.

    Returns a LongTensor [N, seq_len]; the incomplete tail is dropped, and at most `max_blocks` are kept.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be positive or None, got {max_blocks}")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if sep is None:
        name = type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} has neither an EOS nor a SEP token to join documents with")
    encoded = tokenizer(_texts(docs), add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in (ids for ids in encoded if ids):
        if stream:
            stream.append(sep)
        stream.extend(ids)
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(
            f"{len(docs)} documents give {len(stream)} tokens, fewer than one block of seq_len={seq_len}"
        )
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class ClassificationData:
    """Tokenised classification (or regression) examples: padded [N, L] tensors and [N] labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model inputs and labels as a dict (token_type_ids only when the tokenizer makes them)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out

    @classmethod
    def from_documents(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        docs: Sequence[Document],
        seq_len: int,
        pad_to_seq_len: bool = False,
    ) -> "ClassificationData":
        """Tokenise with special tokens, truncate to `seq_len`, pad to the longest example (or to seq_len).

        Integer labels give a long tensor, float labels (regression, e.g. STS-B) a float tensor. The pad
        token is the tokenizer's pad token, else its EOS token.
        """
        if not docs:
            raise ValueError("no documents to tokenise")
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        labels = _label_tensor(docs)
        pairs = [d.text_pair for d in docs]
        if any(p is None for p in pairs) and not all(p is None for p in pairs):
            raise ValueError("either all documents or none must have a text_pair")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            name = type(tokenizer).__name__
            raise ValueError(f"tokenizer {name} has neither a pad nor an EOS token to pad with")
        second = None if pairs[0] is None else pairs
        enc = tokenizer(_texts(docs), second, truncation=True, max_length=seq_len, padding=False)
        length = seq_len if pad_to_seq_len else max(len(ids) for ids in enc["input_ids"])
        left = getattr(tokenizer, "padding_side", "right") == "left"
        input_ids = _pad(enc["input_ids"], length, pad_id, left)
        mask = _pad([[1] * len(ids) for ids in enc["input_ids"]], length, 0, left)
        types = _pad(enc["token_type_ids"], length, 0, left) if "token_type_ids" in enc else None
        return cls(input_ids, mask, labels, types)


def _label_tensor(docs: Sequence[Document]) -> torch.Tensor:
    labels = [d.label for d in docs]
    missing = [i for i, lab in enumerate(labels) if lab is None]
    if missing:
        raise ValueError(
            f"{len(missing)} documents have no label (first: index {missing[0]}); classification needs labels"
        )
    if all(isinstance(lab, int) for lab in labels):
        return torch.tensor(labels, dtype=torch.long)
    return torch.tensor([float(lab) for lab in labels], dtype=torch.float32)


def _pad(rows: list[list[int]], length: int, value: int, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:length]
        if row:
            if left:
                out[i, length - len(row):] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def classification_batches(
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    seq_len: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenise `docs` (see `ClassificationData.from_documents`) and iterate over dict batches."""
    return batches(ClassificationData.from_documents(tokenizer, docs, seq_len), batch_size, shuffle, seed)


# ----------------------------------------------------------------------------------------- batching

Batchable = Union[torch.Tensor, Mapping[str, torch.Tensor], ClassificationData]


def batches(
    data: Batchable, batch_size: int, shuffle: bool, seed: int = 0, start: int = 0, drop_last: bool = False
) -> Iterator[torch.Tensor] | Iterator[dict[str, torch.Tensor]]:
    """Iterate over `data` in batches along dim 0, in an order fixed by `seed` (when shuffling).

    `start` is a position in samples within that order: after k full batches from `start`, resuming
    with start + k * batch_size (same seed) continues exactly where iteration stopped. Use a new
    seed (e.g. seed + epoch) for a new order each epoch. Tensors yield tensors; dicts yield dicts.
    """
    tensors = data.tensors() if isinstance(data, ClassificationData) else data
    n = _num_samples(tensors)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= start <= n:
        raise ValueError(f"start must be in [0, {n}] (samples), got {start}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    return _iterate(tensors, order, batch_size, start, drop_last)


def _num_samples(data: torch.Tensor | Mapping[str, torch.Tensor]) -> int:
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if not isinstance(data, Mapping) or not data:
        raise ValueError(
            "data must be a tensor, a non-empty dict of tensors or ClassificationData, "
            f"got {type(data).__name__}"
        )
    sizes = {k: v.shape[0] for k, v in data.items() if v is not None}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all tensors must have the same first dimension, got {sizes}")
    return next(iter(sizes.values()))


def _iterate(data, order: torch.Tensor, batch_size: int, start: int, drop_last: bool):
    for i in range(start, order.numel(), batch_size):
        idx = order[i : i + batch_size]
        if drop_last and idx.numel() < batch_size:
            return
        if isinstance(data, torch.Tensor):
            yield data[idx]
        else:
            yield {k: v[idx] for k, v in data.items() if v is not None}
