"""Text data for pruning and evaluation: load documents, split them without leakage, and tokenise them.

Language-model data becomes fixed-length token blocks; classification data becomes padded tensors; SQuAD-style
questions become overlapping windows over their passage with answer-span labels and character offsets.
"""
from __future__ import annotations

import builtins
import bz2
import copyreg
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import random
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    "gensim:<file name in gensim's test data>, pydoc:topics (Python's language reference), "
    "package:<import name>/<glob> (text files an installed package ships, one document per file), "
    "a local .txt (one document per line), .jsonl, .json, .csv, .tsv or MediaWiki dump (.bz2) file, "
    "or hf:<dataset>[:<config>]:<split>"
)
TEACHER_PREFIX = "teacher:"  # teacher:N, sequences sampled from the dense model: vtrans.teacher, not this module
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
    if source.startswith(TEACHER_PREFIX):
        raise ValueError(f"source {source!r} is sampled from the dense model by the job (vtrans.teacher), not read "
                         f"from disk; load_documents accepts: {ACCEPTED_SOURCES}")
    if source.startswith("gensim:"):
        corpus = _load_gensim(source[len("gensim:"):], source)
    elif source.startswith("pydoc:"):
        corpus = _load_pydoc(source[len("pydoc:"):], source)
    elif source.startswith("package:"):
        corpus = _load_package_files(source[len("package:"):], source)
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
        available = sorted(p.name for p in path.parent.iterdir()
                           if p.suffix in (".cor", ".txt", ".bz2") or p.name == NEWSGROUPS_FILE)
        raise FileNotFoundError(
            f"gensim test data has no file {name!r} (looked in {path.parent}); available text files: "
            f"{', '.join(available)}"
        )
    if path.suffix == ".bz2":
        return _mediawiki_corpus(path, source)
    if path.name == NEWSGROUPS_FILE:
        return _newsgroups_corpus(path, source)
    return _text_lines_corpus(path, source)


NEWSGROUPS_FILE = "mini_newsgroup"  # gensim's 200 posts of 20 Newsgroups (alt.atheism, sci.space): a pickled Bunch


class _Ignored:
    """Stands in for the numpy arrays of a pickled scikit-learn Bunch (its labels), which are not needed."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _BunchUnpickler(pickle.Unpickler):
    """Reads a pickled scikit-learn Bunch of strings without scikit-learn or numpy, and runs no other code: only a
    dict reconstructor and plain containers are allowed; numpy objects become _Ignored."""

    def find_class(self, module: str, name: str):
        if name == "_reconstructor" and module in ("copy_reg", "copyreg"):
            return copyreg._reconstructor
        if name == "Bunch":
            return dict
        if module in ("__builtin__", "builtins") and name in ("dict", "list", "object", "str", "tuple"):
            return getattr(builtins, name)
        if module.split(".")[0] == "numpy":
            return _Ignored
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a pickled corpus")


def _newsgroups_corpus(path: Path, source: str) -> Corpus:
    """One document per post, its mail headers (everything before the first blank line) removed."""
    bunch = _BunchUnpickler(io.BytesIO(zlib.decompress(path.read_bytes())), encoding="latin-1").load()
    posts = [post.split("\n\n", 1)[-1].strip() for post in bunch["data"]]
    return Corpus([Document(post) for post in posts if post], source)


def _mediawiki_corpus(path: Path, source: str) -> Corpus:
    """One document per article of a MediaWiki XML dump (.bz2), as plain text: markup stripped by gensim's
    filter_wiki, bold / italic quotes and heading marks removed; redirects and non-article pages skipped."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise ValueError(f"source {source!r} is a MediaWiki dump, which needs the gensim package (pip install gensim)"
                         ) from exc
    docs = []
    with bz2.open(path) as f:
        try:
            for title, text, _ in extract_pages(f):
                if ":" in title or text.lstrip()[:9].upper() == "#REDIRECT":
                    continue
                text = re.sub(r"'{2,}", "", filter_wiki(text))
                text = _WIKI_HEADING.sub(r"\2", text)
                text = re.sub(r"\n{3,}", "\n\n", text).strip()
                if text:
                    docs.append(Document(text))
        except (OSError, EOFError) as exc:  # not bzip2, or truncated
            raise ValueError(f"{source!r} is not a bzip2-compressed MediaWiki XML dump: {exc}") from exc
    return Corpus(docs, source)


_WIKI_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)


def _load_pydoc(name: str, source: str) -> Corpus:
    """Python's language reference as the interpreter ships it (pydoc_data.topics): one document per topic."""
    if name != "topics":
        raise ValueError(f"source {source!r}: the accepted pydoc source is pydoc:topics")
    from pydoc_data.topics import topics

    return Corpus([Document(topics[k].strip()) for k in sorted(topics) if topics[k].strip()], source)


def _load_package_files(spec: str, source: str) -> Corpus:
    """package:<import name>/<glob>: the text files an installed package ships (e.g. its documentation), one
    document per file, in sorted order."""
    module, _, pattern = spec.partition("/")
    if not module or not pattern:
        raise ValueError(f"source {source!r}: expected package:<import name>/<glob>, "
                         "e.g. package:sklearn/datasets/descr/*.rst")
    spec_ = importlib.util.find_spec(module)
    if spec_ is None or not spec_.submodule_search_locations:
        raise ValueError(f"source {source!r}: no installed package is imported as {module!r}")
    root = Path(list(spec_.submodule_search_locations)[0])
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"source {source!r}: no file in {root} matches {pattern!r}")
    texts = [_read_text(p).strip() for p in files]
    return Corpus([Document(t) for t in texts if t], source)


def _load_local(
    source: str, text_field: str | Sequence[str], label_field: str | None, limit: int | None
) -> Corpus:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", source) and not Path(source).exists():
        raise ValueError(f"unknown source scheme in {source!r}; accepted: {ACCEPTED_SOURCES}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".bz2" and path.is_file():
        return _mediawiki_corpus(path, source)
    if suffix not in TEXT_SUFFIXES and suffix not in DATASET_SUFFIXES:
        accepted = ", ".join((*TEXT_SUFFIXES, *DATASET_SUFFIXES, ".bz2"))
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
    try:
        ds = datasets.load_dataset(DATASET_SUFFIXES[suffix], data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets reports a broken line as a generic generation error
        raise _file_error(path, exc) from exc
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
    ds = _hf_dataset(match)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _dataset_corpus(ds, source, text_field, label_field)


def _hf_dataset(match: re.Match):
    name, config, split = match["name"], match["config"], match["split"]
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing cache, bad config or split: all reported the same way
        offline = OFFLINE_HINT if datasets.config.HF_HUB_OFFLINE else ""
        raise ValueError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(exc).__name__}: {exc}.{offline}"
        ) from exc


def _file_error(path: Path, exc: Exception) -> ValueError:
    """What is wrong with a data file `datasets` could not read: the first line of JSON lines that is not a JSON
    object (with its number), else the file and the library's own error."""
    if path.suffix.lower() in (".jsonl", ".json"):
        bad = _first_bad_json_line(path)
        if bad is not None:
            n, why = bad
            return ValueError(f"{str(path)!r} line {n} is not a JSON object ({why}); a .jsonl file holds one JSON "
                              "object per line")
    return ValueError(f"could not read {str(path)!r}: {type(exc).__name__}: {exc}")


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return None  # one JSON document: the problem is elsewhere
        except json.JSONDecodeError:
            pass
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return n, f"{e.msg} at column {e.colno}: {line[:60]!r}"
        if not isinstance(value, dict):
            return n, f"a JSON {type(value).__name__}, not an object"
    return None


TEXT_CONTROL_LIMIT = 0.01  # a text file may hold at most 1 % control characters (other than whitespace)
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")


def _read_text(path: Path) -> str:
    """A text file's contents: UTF-8, else latin-1 (with a warning). A file that is not text (a high share of control
    characters, as in binary data or UTF-16) is refused, naming it."""
    raw = path.read_bytes()
    try:
        text, encoding = raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError as e:
        text, encoding = raw.decode("latin-1"), "latin-1"
        logger.warning("%s is not UTF-8 (%s); reading it as latin-1", path, e)
    if text:
        share = len(_CONTROL.findall(text)) / len(text)
        if share > TEXT_CONTROL_LIMIT:
            raise ValueError(f"{str(path)!r} does not look like text: {share:.1%} of its characters (read as "
                             f"{encoding}) are control characters, at most {TEXT_CONTROL_LIMIT:.0%} are accepted; give "
                             "a UTF-8 (or latin-1) text file")
    return text


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
    heldout = _held_groups(groups, target, seed)
    held = set(heldout)
    train = [i for i in range(len(docs)) if i not in held]
    if not heldout or not train:
        raise ValueError(
            f"cannot split {len(docs)} documents ({len(groups)} distinct) into two non-empty parts"
        )
    return _pick(docs, train), _pick(docs, heldout)


def _held_groups(groups: list[list[int]], target: int, seed: int) -> list[int]:
    """Indices of whole groups, taken in a seed-shuffled order while they fit, up to `target` items (shuffles
    `groups` in place)."""
    random.Random(seed).shuffle(groups)
    held: list[int] = []
    for group in groups:
        if len(held) + len(group) <= target:
            held.extend(group)
        if len(held) == target:
            break
    return held


def heldout_split(
    docs: Sequence[Document], heldout_fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> tuple[list[Document], list[Document]]:
    """(train, heldout) as configured (data.folds / data.fold): fold `fold` of a `folds`-fold split when folds >= 2
    (across the folds every document is held out exactly once), else a random heldout_fraction split."""
    if folds:
        return kfold(docs, folds, fold, seed)
    return split_documents(docs, heldout_fraction, seed)


def subsample(docs: Sequence[Document], fraction: float, seed: int) -> list[Document]:
    """A deterministic random subset of round(len(docs) * fraction) documents (at least one), in order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not docs:
        raise ValueError("cannot subsample an empty list of documents")
    n = max(1, round(len(docs) * fraction))
    return _pick(docs, random.Random(seed).sample(range(len(docs)), n))


def subsample_at_least(
    docs: Sequence[Document], fraction: float, seed: int, minimum: int, size: Callable[[list[Document]], int] = len
) -> list[Document]:
    """subsample(docs, fraction, seed), grown while size(subset) < minimum (and documents remain).

    Growth adds documents in a fixed seeded order, so each larger subset contains the smaller ones and the first is
    exactly subsample's; `size` measures a subset (e.g. the sequences it tokenises into), once per subset tried, and
    the subset returned is the last one it measured."""
    subset = subsample(docs, fraction, seed)
    have = size(subset)
    if have >= minimum or len(subset) == len(docs):
        return subset
    chosen = random.Random(seed).sample(range(len(docs)), len(subset))
    rest = sorted(set(range(len(docs))) - set(chosen))
    random.Random(seed + 1).shuffle(rest)
    order, n = chosen + rest, len(subset)
    while have < minimum and n < len(docs):
        # grow in proportion to the shortfall (exact when a document is one sequence), by at least one document
        n = min(len(docs), max(n + 1, math.ceil(n * minimum / max(have, 1))))
        subset = _pick(docs, order[:n])
        have = size(subset)
    return subset


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


def lm_blocks_streamed(
    tokenizer: PreTrainedTokenizerBase,
    docs: Iterable[Document | str],
    seq_len: int,
    max_blocks: int | None = None,
    chunk: int = 1000,
) -> tuple[torch.Tensor, int]:
    """`lm_blocks` over an iterable of documents (e.g. a streamed hub split), tokenised `chunk` documents at a time
    and stopped as soon as `max_blocks` full blocks are there: the corpus is never held whole. Returns (blocks, the
    number of documents read)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if sep is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither an EOS nor a SEP token to join documents")
    stream: list[int] = []
    pending: list[str] = []
    n_docs = 0

    def flush() -> None:
        if not pending:
            return
        for ids in tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                if stream:
                    stream.append(sep)
                stream.extend(ids)
        pending.clear()

    for doc in docs:
        pending.append(doc if isinstance(doc, str) else doc.text)
        n_docs += 1
        if len(pending) >= chunk:
            flush()
            if max_blocks is not None and len(stream) >= max_blocks * seq_len:
                break
    flush()
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(f"{n_docs} documents give {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len), n_docs


def stream_documents(source: str, text_field: str = "text") -> Iterator[Document]:
    """Documents of an `hf:<dataset>[:<config>]:<split>` source read as a stream (datasets' streaming mode): nothing
    is downloaded or prepared beyond what is read."""
    match = _HF_SOURCE.match(source[len("hf:"):]) if source.startswith("hf:") else None
    if match is None:
        raise ValueError(f"data.streaming=true needs an hf:<dataset>[:<config>]:<split> source, got {source!r}")
    import datasets

    ds = datasets.load_dataset(match["name"], match["config"], split=match["split"], streaming=True)
    for row in ds:
        if text_field not in row:
            raise ValueError(f"{source!r} has no text field {text_field!r}; fields: {sorted(row)}")
        if row[text_field]:
            yield Document(_as_text(row[text_field], source))


class TokenCache:
    """Token blocks tokenised once and kept on disk (int64 .npy, memory-mapped when read): built by one process, read
    by all, by every later job with the same data, tokenizer and split. Each entry is a folder named by the key
    (`key`: a hash of everything that decides the blocks) holding <part>.npy files and meta.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    @staticmethod
    def key(fields: dict) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """({part: LongTensor [N, T] backed by the memory-mapped file}, meta) or None when not cached."""
        import numpy as np

        entry = self.root / key
        if not (entry / "meta.json").is_file():
            return None
        meta = json.loads((entry / "meta.json").read_text())
        parts = {}
        for part in meta["parts"]:
            array = np.load(entry / f"{part}.npy", mmap_mode="r")
            with warnings.catch_warnings():  # a read-only mapping: blocks are only ever read
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                parts[part] = torch.from_numpy(array)
        return parts, meta

    def save(self, key: str, parts: dict[str, torch.Tensor], meta: dict) -> None:
        """Written to a temporary folder, then renamed: a reader never sees half an entry."""
        import shutil

        import numpy as np

        self.root.mkdir(parents=True, exist_ok=True)
        entry, tmp = self.root / key, self.root / f".tmp-{key}-{os.getpid()}"
        if entry.exists():
            return
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for part, blocks in parts.items():
            np.save(tmp / f"{part}.npy", blocks.numpy().astype(np.int64))
        (tmp / "meta.json").write_text(json.dumps({**meta, "parts": sorted(parts)}, indent=2))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process won the race: its entry is the same
            shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> Path:
    """$VTRANS_CACHE, else ~/.cache/vtrans: token blocks go to its tokens/ folder."""
    return Path(os.environ.get("VTRANS_CACHE") or Path.home() / ".cache" / "vtrans")


def source_identity(source: str) -> dict:
    """What identifies a source's content for the cache: a local file's path, size and modification time; otherwise
    the source string itself (a gensim file or hub split name)."""
    if not source:
        return {}
    if source.startswith("gensim:"):
        logging.getLogger("gensim").setLevel(logging.WARNING)  # its test utilities log a dictionary build at import
        try:
            from gensim.test.utils import datapath

            path = Path(datapath(source[len("gensim:"):]))
        except ImportError:
            return {"source": source}
    elif source.startswith("hf:"):
        return {"source": source}
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        return {"source": source}
    st = path.stat()
    return {"source": source, "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def lm_windows(
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document | str],
    seq_len: int,
    max_blocks: int | None = None,
    joiner: str = "\n\n",
) -> torch.Tensor:
    """The published perplexity protocol's input (LLM-Pruner, FLAP, SliceGPT, TVA-Prune on WikiText-2): the documents
    joined with `joiner` into one text, tokenised once as the tokenizer does by default (a BOS first when it adds
    one), cut into non-overlapping windows of `seq_len` tokens; the incomplete tail is dropped.

    Returns a LongTensor [N, seq_len] (each window is then scored on its own: tokens 1..seq_len-1).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be positive or None, got {max_blocks}")
    stream = tokenizer(joiner.join(_texts(docs)), verbose=False)["input_ids"]
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(f"{len(docs)} documents give {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def spread_blocks(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """`k` rows of `blocks` evenly spaced from the first to the last (all of them when k is 0 or >= their number):
    a fixed sample that covers a whole corpus rather than its first documents."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = blocks.shape[0]
    if k == 0 or k >= n:
        return blocks
    return blocks[torch.linspace(0, n - 1, k).round().long()]


def mix_blocks(parts: Sequence[torch.Tensor], weights: Sequence[float], seed: int, total: int = 0) -> torch.Tensor:
    """A mixture of LM token blocks: source i gives round(share_i * total) rows, share_i = weights[i] / sum(weights).

    `total` 0 means the smallest mixture that holds every block of every part at least once (a part smaller than
    its share is repeated: whole copies, then a seeded subset of the rest); a part larger than its share gives a
    seeded subset. Rows come out in a seeded random order."""
    if not parts or len(parts) != len(weights):
        raise ValueError(f"need one weight per part, got {len(parts)} parts and {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise ValueError(f"mixture weights must be > 0, got {list(weights)}")
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:
        raise ValueError(f"every part must have the same block length, got {sorted(widths)}")
    shares = [w / sum(weights) for w in weights]
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if not total:
        total = max(math.ceil(p.shape[0] / s - 1e-9) for p, s in zip(parts, shares))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for part, share in zip(parts, shares):
        want = max(1, round(share * total))
        copies, rest = divmod(want, part.shape[0])
        rows += [part] * copies + [part[torch.randperm(part.shape[0], generator=g)[:rest].sort().values]]
    mixed = torch.cat(rows)
    return mixed[torch.randperm(mixed.shape[0], generator=g)]


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


# ----------------------------------------------------------------------------------------- question answering

QA_SUFFIXES = (".json", ".jsonl")
ACCEPTED_QA_SOURCES = (
    "a local .json file (the official nested SQuAD v1.1 layout {\"data\": [{\"title\", \"paragraphs\": [{\"context\", "
    "\"qas\": [{\"id\", \"question\", \"answers\": [{\"text\", \"answer_start\"}]}]}]}]}, or a list of flat records), "
    "a .jsonl file of flat records {id, context, question, answers: {text: [...], answer_start: [...]}}, "
    "or hf:<dataset>[:<config>]:<split> (e.g. hf:rajpurkar/squad:validation)"
)


@dataclass
class QAExample:
    """One SQuAD question: the gold answers' texts and character starts in `context`; `title` names the article
    (empty when the source has none). Splits keep an article's (else a context's) questions together."""

    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]
    title: str = ""


def load_qa_examples(
    source: str,
    question_field: str = "question",
    context_field: str = "context",
    answers_field: str = "answers",
    title_field: str = "title",
    limit: int | None = None,
) -> list[QAExample]:
    """SQuAD-layout questions from `source` (see ACCEPTED_QA_SOURCES). The field names apply to flat records (the
    official nested layout has fixed names); a missing title field means no articles. Question ids must be unique."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"question answering source must be a non-empty string; accepted: {ACCEPTED_QA_SOURCES}")
    fields = (question_field, context_field, answers_field)
    if source.startswith("hf:"):
        match = _HF_SOURCE.match(source[len("hf:"):])
        if match is None:
            raise ValueError(f"bad Hugging Face source {source!r}; expected hf:<dataset>[:<config>]:<split>, "
                             "e.g. hf:rajpurkar/squad:validation")
        ds = _hf_dataset(match)
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise ValueError(f"{source!r} has no field(s) {missing}; available fields: {ds.column_names} (set "
                             "data.question_field / data.context_field / data.answers_field)")
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        examples = [_flat_qa_example(row, i, fields, title_field, source) for i, row in enumerate(ds)]
    else:
        examples = _local_qa_examples(source, fields, title_field)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"source {source!r} contains no questions")
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise ValueError(f"{source!r}: question id {ex.id!r} occurs more than once; ids must be unique")
        seen.add(ex.id)
    logger.info("loaded %d questions from %s", len(examples), source)
    return examples


def _local_qa_examples(source: str, fields: tuple[str, str, str], title_field: str) -> list[QAExample]:
    path = Path(source).expanduser()
    if path.suffix.lower() not in QA_SUFFIXES:
        raise ValueError(f"unsupported file type {path.suffix or '(none)'!r} for question answering source "
                         f"{source!r}; accepted: {ACCEPTED_QA_SOURCES}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; accepted: {ACCEPTED_QA_SOURCES}")
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:  # JSON lines: one record per line
        value = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    value.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{source!r} line {n} is not a JSON record: {exc}") from exc
    if isinstance(value, dict) and "data" in value:
        return _nested_squad_examples(value["data"], source)
    records = [value] if isinstance(value, dict) else value
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{source!r} holds neither SQuAD's nested layout nor flat records; "
                         f"accepted: {ACCEPTED_QA_SOURCES}")
    return [_flat_qa_example(r, i, fields, title_field, source) for i, r in enumerate(records)]


def _nested_squad_examples(articles, source: str) -> list[QAExample]:
    """The official SQuAD v1.1 json: data[i] = {title, paragraphs: [{context, qas: [{id, question, answers}]}]}."""
    out = []
    try:
        for a, article in enumerate(articles):
            title = str(article.get("title", "")) or f"article-{a}"
            for paragraph in article["paragraphs"]:
                context = _as_text(paragraph["context"], source)
                for qa in paragraph["qas"]:
                    texts, starts = _answer_lists(qa["answers"], source)
                    out.append(QAExample(str(qa["id"]), _as_text(qa["question"], source), context, texts, starts,
                                         title))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{source!r}: malformed SQuAD json ({type(exc).__name__}: {exc}); expected "
                         "data[i].paragraphs[j] = {context, qas: [{id, question, answers: [{text, answer_start}]}]}"
                         ) from exc
    return out


def _flat_qa_example(row, index: int, fields: tuple[str, str, str], title_field: str, source: str) -> QAExample:
    question_field, context_field, answers_field = fields
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(f"{source!r} record {index} has no field(s) {missing}; available fields: {sorted(row)} "
                         "(set data.question_field / data.context_field / data.answers_field)")
    texts, starts = _answer_lists(row[answers_field], source)
    title = row.get(title_field) or ""
    return QAExample(str(row.get("id", index)), _as_text(row[question_field], source),
                     _as_text(row[context_field], source), texts, starts, str(title))


def _answer_lists(answers, source: str) -> tuple[list[str], list[int]]:
    """{"text": [...], "answer_start": [...]} (the HF layout) or [{"text", "answer_start"}] (the official one)."""
    if isinstance(answers, dict):
        texts, starts = list(answers.get("text", [])), list(answers.get("answer_start", []))
    elif isinstance(answers, list) and all(isinstance(a, dict) for a in answers):
        texts, starts = [a.get("text") for a in answers], [a.get("answer_start") for a in answers]
    else:
        raise ValueError(f"{source!r}: answers must be {{text: [...], answer_start: [...]}} or a list of "
                         f"{{text, answer_start}}, got {answers!r:.120}")
    if len(texts) != len(starts) or not all(isinstance(t, str) for t in texts) or \
            not all(isinstance(s, int) and s >= 0 for s in starts):
        raise ValueError(f"{source!r}: every answer needs a text and a character answer_start >= 0, got "
                         f"{answers!r:.120}")
    return texts, starts


def split_qa_examples(
    examples: Sequence[QAExample], heldout_fraction: float, seed: int
) -> tuple[list[QAExample], list[QAExample]]:
    """Split questions into (train, heldout), deterministically for a seed, keeping every article together (every
    context where there are no titles): no passage is seen on both sides. About round(n * heldout_fraction)
    questions are held out (whole articles, so not exactly); both parts keep source order."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction}")
    groups = _passage_groups(examples)
    target = max(1, round(len(examples) * heldout_fraction))
    if len(groups) < 2:
        raise ValueError(f"cannot split {len(examples)} questions on one article / context into train and held-out "
                         "parts; use more passages or set data.eval_source")
    held = _held_groups(groups, target, seed)
    if not held:  # every article is larger than the target: hold out the smallest
        held = min(groups, key=len)
    chosen = set(held)
    return ([ex for i, ex in enumerate(examples) if i not in chosen],
            [ex for i, ex in enumerate(examples) if i in chosen])


def _passage_groups(examples: Sequence[QAExample]) -> list[list[int]]:
    """Indices of questions that share an article title or a context (transitively), in order of first occurrence."""
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, ex in enumerate(examples):
        for key in ((("title", ex.title),) if ex.title else ()) + (("context", ex.context),):
            a, b = root(i), root(first.setdefault(key, i))
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(examples)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


@dataclass
class QAFeatures:
    """SQuAD questions tokenised as [CLS] question [SEP] context window [SEP], one row per window (a long context
    gives several overlapping windows). `start_positions` / `end_positions` label the first gold answer's tokens
    (the [CLS] index when the answer is not inside the window); `offsets[f, t]` is the (start, end) character span
    of context token t in its example's context, (-1, -1) for question, special and padding tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    start_positions: torch.Tensor
    end_positions: torch.Tensor
    offsets: torch.Tensor
    example_index: list[int]
    examples: list[QAExample]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Model inputs and answer-span labels (the QA models' `start_positions` / `end_positions`)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
               "start_positions": self.start_positions, "end_positions": self.end_positions}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


def qa_features(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[QAExample],
    seq_len: int,
    doc_stride: int,
    max_features: int | None = None,
) -> QAFeatures:
    """Tokenise questions with their contexts into windows of `seq_len` tokens (only the context is truncated;
    consecutive windows share `doc_stride` context tokens, fewer when a long question leaves less room), padded to
    seq_len. Needs a fast tokenizer (character offsets). At most `max_features` windows are kept."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"question answering needs a fast tokenizer (character offsets); "
                         f"{type(tokenizer).__name__} is not one")
    if not examples:
        raise ValueError("no questions to tokenise")
    if doc_stride < 1:
        raise ValueError(f"doc_stride must be >= 1, got {doc_stride}")
    questions = [ex.question.lstrip() for ex in examples]  # leading blanks would only take window room
    longest = max(len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"])
    room = seq_len - tokenizer.num_special_tokens_to_add(pair=True) - longest  # context tokens per window
    if room < 2:
        raise ValueError(f"data.seq_len={seq_len} leaves {room} context tokens per window beside the longest "
                         f"question ({longest} tokens); raise data.seq_len")
    stride = min(doc_stride, room - 1)
    if stride < doc_stride:
        logger.info("doc stride %d lowered to %d: windows of %d tokens hold %d context tokens beside the longest "
                    "question", doc_stride, stride, seq_len, room)
    enc = tokenizer(questions, [ex.context for ex in examples], truncation="only_second", max_length=seq_len,
                    stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length")
    n = len(enc["input_ids"]) if max_features is None else min(max_features, len(enc["input_ids"]))
    sample = list(enc["overflow_to_sample_mapping"][:n])
    sequence = torch.tensor([[-1 if s is None else s for s in enc.sequence_ids(f)] for f in range(n)])
    offsets = torch.tensor(enc["offset_mapping"][:n], dtype=torch.int32).masked_fill(sequence.unsqueeze(-1) != 1, -1)
    input_ids = torch.tensor(enc["input_ids"][:n], dtype=torch.long)
    cls_id = tokenizer.cls_token_id
    cls = (input_ids == cls_id).long().argmax(1) if cls_id is not None else torch.zeros(n, dtype=torch.long)
    starts, ends = _answer_tokens([examples[i] for i in sample], offsets)
    missing = starts < 0
    types = torch.tensor(enc["token_type_ids"][:n], dtype=torch.long) if "token_type_ids" in enc else None
    return QAFeatures(input_ids, torch.tensor(enc["attention_mask"][:n], dtype=torch.long), types,
                      torch.where(missing, cls, starts), torch.where(missing, cls, ends), offsets, sample,
                      list(examples))


def _answer_tokens(examples: list[QAExample], offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, (first, last) token of its example's first gold answer: the context tokens holding the answer's
    first and last characters; (-1, -1) when the window does not hold the whole answer (or there is none)."""
    n, length, _ = offsets.shape
    begin = torch.tensor([ex.answer_starts[0] if ex.answers else -1 for ex in examples])
    end = torch.tensor([ex.answer_starts[0] + len(ex.answers[0]) if ex.answers else -1 for ex in examples])
    context = offsets[..., 0] >= 0
    far = torch.iinfo(offsets.dtype).max
    inside = (begin >= 0) & context.any(1) \
        & (offsets[..., 0].masked_fill(~context, far).min(1).values <= begin) \
        & (offsets[..., 1].masked_fill(~context, -1).max(1).values >= end)
    position = torch.arange(length).expand(n, length)
    start = position.masked_fill(~(context & (offsets[..., 0] <= begin[:, None])), -1).max(1).values
    after = context & (position >= start[:, None]) & (offsets[..., 1] >= end[:, None])
    stop = position.masked_fill(~after, length).min(1).values
    return torch.where(inside, start, -1), torch.where(inside, stop, -1)


# ----------------------------------------------------------------------------------------- batching

Batchable = Union[torch.Tensor, Mapping[str, torch.Tensor], ClassificationData, QAFeatures]


def batches(
    data: Batchable, batch_size: int, shuffle: bool, seed: int = 0, start: int = 0, drop_last: bool = False
) -> Iterator[torch.Tensor] | Iterator[dict[str, torch.Tensor]]:
    """Iterate over `data` in batches along dim 0, in an order fixed by `seed` (when shuffling).

    `start` is a position in samples within that order: after k full batches from `start`, resuming
    with start + k * batch_size (same seed) continues exactly where iteration stopped. Use a new
    seed (e.g. seed + epoch) for a new order each epoch. Tensors yield tensors; dicts yield dicts.
    """
    tensors = data.tensors() if hasattr(data, "tensors") else data  # ClassificationData, QAFeatures
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
            "data must be a tensor, a non-empty dict of tensors, ClassificationData or QAFeatures, "
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
