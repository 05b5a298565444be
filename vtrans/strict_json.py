"""Strict JSON for every file a job writes (metrics.json, the export record, the probe's results, the decision): NaN
and +/-Infinity, which Python's json writes but JSON parsers reject, become null, and the keys that held them are
listed (`NON_FINITE_KEY`), so a diverged run still leaves a file every tool can read and says what diverged."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

NON_FINITE_KEY = "non_finite_keys"  # the flag: dotted paths of the values written as null because they were not finite


def sanitize(value: Any, path: str = "", found: list[str] | None = None) -> tuple[Any, list[str]]:
    """(a copy of `value` made of plain JSON types with non-finite floats as None, the paths of those floats).
    Tensors and numpy scalars become numbers or lists; other objects (paths, enums) their str()."""
    found = [] if found is None else found
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value, found
    if isinstance(value, float):
        if math.isfinite(value):
            return value, found
        found.append(path or "<value>")
        return None, found
    if isinstance(value, dict):
        return {str(k): sanitize(v, f"{path}.{k}" if path else str(k), found)[0] for k, v in value.items()}, found
    if isinstance(value, (list, tuple)):
        return [sanitize(v, f"{path}[{i}]", found)[0] for i, v in enumerate(value)], found
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return sanitize(value.tolist(), path, found)
    return str(value), found


def dumps(value: Any, flag: bool = False, **kwargs) -> str:
    """Strict JSON text of `value`; with `flag` (a dict), NON_FINITE_KEY lists the non-finite values' paths."""
    clean, found = sanitize(value)
    if flag:
        if not isinstance(clean, dict):
            raise TypeError(f"flag=True needs a dict, got {type(value).__name__}")
        clean[NON_FINITE_KEY] = found
    return json.dumps(clean, allow_nan=False, **kwargs)


def write(path: str | Path, value: Any, flag: bool = False, **kwargs) -> Path:
    path = Path(path)
    path.write_text(dumps(value, flag=flag, **kwargs) + "\n", encoding="utf-8")
    return path


def loads(text: str) -> Any:
    """Parse JSON strictly: NaN / Infinity literals are errors (what a standard JSON parser does)."""
    def reject(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=reject)
