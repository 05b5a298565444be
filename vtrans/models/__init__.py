"""Model families: one file each (llama, mistral, qwen2, bert, roberta, gpt2) holding its adapter (`Family`: where
its structures live, its config fields, its pruned and stock classes) and its pruned classes; `common` what they
share. This module finds a model's family, reads its shape, registers the pruned classes with the Auto classes,
saves pruned models in their self-contained format and converts uniform ones to stock classes."""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import torch

from ..shape import LayerShape, ModelShape
from . import bert, gpt2, llama, mistral, qwen2, roberta  # noqa: F401  each registers its Family
from .common import FAMILIES, Family, get_module, has_module, head_kind

MODEL_TYPES = {t: fam for fam in FAMILIES.values() for t in fam.model_types}
PRUNED_TYPES = {fam.pruned_config.model_type: fam for fam in FAMILIES.values()}

__all__ = ["FAMILIES", "Family", "MODEL_TYPES", "base_model", "family_of", "get_module", "has_module", "head_kind",
           "is_pruned", "layers_of", "register_auto", "save_pruned", "shape_of", "to_stock"]


def family_of(obj) -> Family:
    """The family of a model, a config, or a Hugging Face model_type string."""
    config = getattr(obj, "config", obj)
    mt = config if isinstance(config, str) else getattr(config, "model_type", None)
    fam = MODEL_TYPES.get(mt) or PRUNED_TYPES.get(mt)
    if fam is None:
        raise ValueError(f"model family {mt!r} is not supported; supported Hugging Face model types: "
                         f"{sorted(MODEL_TYPES)}")
    return fam


def is_pruned(config) -> bool:
    return getattr(config, "model_type", None) in PRUNED_TYPES


def base_model(model: torch.nn.Module, fam: Family | None = None) -> torch.nn.Module:
    fam = fam or family_of(model)
    for name in fam.base:
        if hasattr(model, name):
            return getattr(model, name)
    return model  # already the base model


def layers_of(model: torch.nn.Module, fam: Family | None = None) -> torch.nn.ModuleList:
    fam = fam or family_of(model)
    return get_module(base_model(model, fam), fam.layers)


def shape_of(model: torch.nn.Module) -> ModelShape:
    """The shape of a (stock or vtrans-pruned) Hugging Face model, read from its config."""
    fam = family_of(model)
    counts = fam.counts(model.config)
    fields = fam.shape_fields(model.config, head_kind(model))
    return ModelShape(hidden=counts["hidden"], head_dim=counts["head_dim"],
                      layers=[LayerShape(*l) for l in counts["layers"]], **fields)


def register_auto() -> None:
    """Register every pruned config with AutoConfig and each pruned model with its Auto class (idempotent)."""
    import transformers

    for fam in FAMILIES.values():
        transformers.AutoConfig.register(fam.pruned_config.model_type, fam.pruned_config, exist_ok=True)
        for auto_name, target in fam.auto_map("_").items():
            if auto_name != "AutoConfig":
                cls = next(c for c in fam.pruned_models.values() if c.__name__ == target.split(".", 1)[1])
                getattr(transformers, auto_name).register(fam.pruned_config, cls, exist_ok=True)


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def modeling_files(fam: Family) -> list[Path]:
    """The family's own file and every file it imports relatively (what a saved checkpoint carries)."""
    files, todo = [], [Path(sys.modules[fam.pruned_config.__module__].__file__)]
    while todo:
        f = todo.pop()
        if f in files:
            continue
        files.append(f)
        todo += [f.with_name(name + ".py") for name in _RELATIVE_IMPORT.findall(f.read_text())]
    return files


def save_pruned(model, out_dir, **save_kwargs) -> str:
    """save_pretrained `model` to `out_dir` with its family's modeling files beside it and `auto_map` pointing at
    them: it loads with `Auto*.from_pretrained(out_dir, trust_remote_code=True)` without vtrans installed."""
    import json

    fam = family_of(model)
    files = modeling_files(fam)
    auto_map = fam.auto_map(files[0].stem)
    out_dir = os.fspath(out_dir)
    model.config.auto_map = auto_map
    model.save_pretrained(out_dir, **save_kwargs)
    for source in files:
        target = Path(out_dir) / source.name
        if not (target.exists() and os.path.samefile(source, target)):
            shutil.copyfile(source, target)
    config_path = Path(out_dir) / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    if saved.get("auto_map") != auto_map:
        saved["auto_map"] = auto_map
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def to_stock(model):
    """A uniformly pruned vtrans model as its family's stock transformers class (loads without trust_remote_code);
    a stock model is returned as it is. Raises naming why when the shape has no stock equivalent."""
    if not is_pruned(model.config):
        return model
    fam = family_of(model)
    config = fam.stock_config_for(model.config)
    stock = fam.stock_models[head_kind(model)](config)
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if [k for k in missing if k not in tied] or unexpected:
        raise RuntimeError(f"stock conversion of a pruned {fam.name} model: state dict mismatch, missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    stock.tie_weights()
    return stock.to(next(model.parameters()).dtype).eval()
