"""The on-disk cache of what depends only on the dense model and fixed inputs: teacher samples (vtrans.teacher) and
the dense model's perplexities on evaluation data, so a rerun neither samples nor evaluates the dense model again.

Entries are JSON files under <root>/<kind>/<key>.json; the key hashes everything the value depends on (the record),
and the record is stored beside the value and checked on reading. Writes are atomic (a temporary file renamed)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_ENV = "VTRANS_CACHE"  # default cache directory when data.cache_dir is unset (else ~/.cache/vtrans)


def cache_root(cache_dir: str) -> Path:
    """data.cache_dir, else $VTRANS_CACHE, else ~/.cache/vtrans."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vtrans").expanduser()


def model_identity(model_cfg, cache_dir: str = "") -> str:
    """The dense model as the caches see it: a content digest of each file of its folder (weights, config,
    tokenizer; with model.gguf_file, of that file alone), its dtype, GGUF file and subfolder; a hub name that is not
    a local folder stands for itself. Content, not place: the same model installed in two places (another clone's
    virtual environment, another copy of a checkpoint) shares the cache's entries, and a model replaced in place
    does not reuse them. A file's digest is memoised in the cache under its path, size and modification time (kind
    "digests"), so each copy of a file is read once."""
    from .models.load import resolve_model_source

    source, kwargs = resolve_model_source(model_cfg)
    root = Path(source)
    ident = {"gguf_file": kwargs.get("gguf_file", ""), "subdir": model_cfg.subdir, "dtype": model_cfg.dtype}
    if not root.is_dir():
        return json.dumps({**ident, "source": str(source)}, sort_keys=True)
    if ident["gguf_file"]:  # a GGUF file holds the whole model; a folder often keeps several quantisations
        chosen = [root / ident["gguf_file"]]
    else:
        chosen = [p for p in sorted(root.iterdir())
                  if p.is_file() and not p.name.startswith(".") and p.suffix not in IGNORED_SUFFIXES]
    files = [[p.name, file_digest(p, cache_dir)] for p in chosen]
    return json.dumps({**ident, "files": files, "version": IDENTITY_VERSION}, sort_keys=True)


IDENTITY_VERSION = 2  # 1 held the folder's path and the weight files' (name, size, mtime)
IGNORED_SUFFIXES = (".py", ".pyc", ".lock", ".tmp", ".log")  # a package's own code and a folder's transient files


def file_digest(path: Path, cache_dir: str = "") -> str:
    """sha256 of a file's bytes, memoised under (resolved path, size, mtime_ns): a file changed in place has a new
    mtime and is read again."""
    st = path.stat()
    record = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = entry(cache_dir, "digests", record)
    try:
        known = read(memo, record)
    except (ValueError, json.JSONDecodeError, KeyError):
        known = None  # a damaged memo is recomputed, never trusted
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    value = f"sha256:{h.hexdigest()}:{st.st_size}"
    try:
        write(memo, record, value)
    except OSError:
        pass  # a read-only cache only costs the digest again next time
    return value


def entry(cache_dir: str, kind: str, record: dict) -> Path:
    """The file of the entry for `record` (a JSON-serialisable dict of everything the value depends on)."""
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(cache_dir) / kind / f"{key}.json"


def read(path: Path, record: dict):
    """The cached value at `path` (None when absent); an error when the stored record differs (a hash collision or a
    hand-edited file)."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored["record"] != json.loads(json.dumps(record)):
        raise ValueError(f"cache entry {path} was made for {stored['record']}, not {record}; remove it")
    return stored["value"]


def write(path: Path, record: dict, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"record": record, "value": value}))
    tmp.replace(path)  # atomic: a reader never sees half a file


def digest(tensor) -> str:
    """A content hash of a tensor (evaluation token blocks)."""
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest() + str(tuple(tensor.shape))
