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


def model_identity(model_cfg) -> str:
    """The dense model as the cache sees it: where it loads from, its dtype, and a fingerprint of its weight files
    (name, size, modification time), so entries of a model replaced in place are not reused."""
    from .models.load import resolve_model_source

    source, kwargs = resolve_model_source(model_cfg)
    root = Path(source)
    files = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".pth") and p.is_file():
                st = p.stat()
                files.append([p.name, st.st_size, st.st_mtime_ns])
    return json.dumps({"source": str(source), "gguf_file": kwargs.get("gguf_file", ""), "subdir": model_cfg.subdir,
                       "dtype": model_cfg.dtype, "files": files}, sort_keys=True)


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
