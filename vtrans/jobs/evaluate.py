"""The evaluate job (a saved model directory, or the configured model: task metric + parameters + FLOPs), and
what the finetune / export / probe jobs share with it: loading models, the evaluation data, the task metrics
(perplexity; GLUE accuracy / F1 / Matthews or Pearson / Spearman; SQuAD v1.1 exact match / F1; zero-shot tasks
through lm-evaluation-harness) with a progress bar, and size / FLOPs accounting."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import data as D
from ..accounting import flops_per_token, model_numel, param_count
from ..config import Config, ModelConfig
from ..evaluation import classification_metrics, perplexity, qa_metrics, regression_metrics
from ..log import RunLogger, rows_from_counts, write_structure
from ..models.spec import shape_of
from . import is_main_process, set_objective

log = logging.getLogger("vtrans")


# ---------------------------------------------------------------------------------------------- models


def dir_model_config(cfg: Config, path: str) -> ModelConfig:
    """The ModelConfig of a saved model directory, with the configured task, labels and dtype."""
    return replace(cfg.model, package="", name_or_path=str(path), subdir="", gguf_file="")


def load(mc: ModelConfig, eager: bool = False):
    """(model, tokenizer) of a configured model or a saved (pruned) directory, in eval mode."""
    from ..models.load import load_model

    model, tokenizer = load_model(mc)
    if eager:  # attention weights are only returned by the eager implementation
        model.set_attn_implementation("eager")
    return model.eval(), tokenizer


def evaluated_model_config(cfg: Config) -> ModelConfig:
    return dir_model_config(cfg, cfg.model_dir) if cfg.model_dir else cfg.model


def dense_reference_shape(cfg: Config):
    """The configured (dense) model's shape without loading its weights (a meta-device instance); None when its
    config cannot be read (e.g. a hub name on an offline machine)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering
    from transformers import AutoModelForSequenceClassification

    from ..models.load import load_config

    try:
        config = load_config(cfg.model)
    except Exception as e:  # noqa: BLE001 - the comparison is optional
        log.warning("dense reference %s unavailable (%s): no dense sizes reported", cfg.model.name_or_path
                    or cfg.model.package, e)
        return None
    cls = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification,
           "question_answering": AutoModelForQuestionAnswering}.get(cfg.model.task, AutoModel)
    if cfg.model.task == "sequence_classification":
        config.num_labels = cfg.model.num_labels
    with torch.device("meta"):
        model = cls.from_config(config)
    return shape_of(model)


def size_metrics(model, seq_len: int, prefix: str = "") -> dict:
    shape = shape_of(model)
    return {f"params{prefix}": model_numel(model),
            f"params{prefix}_no_embeddings": int(param_count(shape, embeddings=False)),
            f"flops{prefix}": float(flops_per_token(shape, seq_len)),
            f"hidden{prefix}": int(shape.hidden), f"layers{prefix}": len(shape.layers)}


def structure_rows(model, dense=None) -> list[dict]:
    """Per-layer kept counts of a (pruned) model, with the dense shape's counts beside them."""
    def counts(layer_shapes):
        return [{"heads": l.heads, "kv_heads": l.kv_heads, "intermediate": l.intermediate} for l in layer_shapes]

    shape = shape_of(model)
    layers = counts(shape.layers)
    dense_layers = None
    if dense is not None and len(dense.layers) == len(shape.layers):
        dense_layers = counts(dense.layers)
    elif dense is not None and all(l == dense.layers[0] for l in dense.layers):
        dense_layers = counts(dense.layers[:1]) * len(layers)  # a stock model: every layer has the dense counts
    return rows_from_counts(layers, shape.hidden, dense_layers, dense.hidden if dense is not None else None)


# ---------------------------------------------------------------------------------------------- data


def documents(cfg: Config, train_fraction: float | None = None) -> tuple[list, list]:
    """(train documents, evaluation documents), for every job alike. Without data.eval_source the evaluation
    documents are a held-out split of data.source (data.folds / heldout_fraction, same seed); with it, all of
    data.source trains. `train_fraction` (default data.train_fraction) subsamples the training part."""
    dc = cfg.data
    if cfg.model.task == "question_answering":  # held-out questions never share an article / passage with training
        train = qa_examples(dc.source, dc)
        if dc.eval_source:
            held = qa_examples(dc.eval_source, dc)
        else:
            train, held = D.split_qa_examples(train, dc.heldout_fraction, dc.seed)
    else:
        docs = D.load_documents(dc.source, text_field=dc.text_field, label_field=dc.label_field)
        if dc.eval_source:
            train = list(docs)
            held = list(D.load_documents(dc.eval_source, text_field=dc.text_field, label_field=dc.label_field))
        else:
            train, held = D.heldout_split(docs, dc.heldout_fraction, dc.seed, dc.folds, dc.fold)
    fraction = dc.train_fraction if train_fraction is None else train_fraction
    if fraction < 1:
        train = D.subsample(train, fraction, dc.seed)
    if cfg.eval.max_examples:
        held = held[: cfg.eval.max_examples]
    return train, held


def qa_examples(source: str, dc) -> list[D.QAExample]:
    """SQuAD-layout questions of a data source, read with the configured field names."""
    return D.load_qa_examples(source, dc.question_field, dc.context_field, dc.answers_field, dc.title_field)


def task_data(cfg: Config, tokenizer, docs: list, training: bool = False):
    """LM token blocks [N, seq_len], ClassificationData, or QA features, for the configured task."""
    dc = cfg.data
    if cfg.model.task == "causal_lm":
        limit = (dc.max_train_blocks if training else dc.max_eval_blocks) or None
        return D.lm_blocks(tokenizer, docs, dc.seq_len, limit)
    if cfg.model.task == "sequence_classification":
        return D.ClassificationData.from_documents(tokenizer, docs, dc.seq_len)
    return D.qa_features(tokenizer, docs, dc.seq_len, cfg.eval.qa_doc_stride,
                         (dc.max_train_blocks or None) if training else None)


# ---------------------------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress(model, total: int | None, desc: str, enabled: bool, postfix: dict | None = None):
    """A tqdm bar (ETA included) advanced by every forward call of `model`; shown on rank 0 when enabled."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=not (enabled and is_main_process()))
    if postfix:
        bar.set_postfix(postfix)

    def advance(module, args, out):  # returns None: a forward hook's return value would replace the output
        bar.update(1)

    handle = model.register_forward_hook(advance)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


def _ppl_batches(blocks: torch.Tensor, batch_size: int, window: int | None, stride: int | None) -> int:
    if not window:
        return math.ceil(blocks.shape[0] / batch_size)
    stride = stride or window // 2
    length = blocks.numel()
    windows = 1 if length <= window else math.ceil((length - window) / stride) + 1
    return math.ceil(max(windows - 1, 1) / batch_size) + 1


# ---------------------------------------------------------------------------------------------- metrics


def task_metrics(model, tokenizer, cfg: Config, data, desc: str = "evaluate") -> dict:
    """The task's own metrics on `data` (see task_data), with a progress bar showing the model's size."""
    ec, dc = cfg.eval, cfg.data
    size = {"params": f"{model_numel(model) / 1e6:.2f}M"}
    if cfg.model.task == "causal_lm":
        window, stride = dc.eval_window or None, dc.eval_stride or None
        total = _ppl_batches(data, ec.batch_size, window, stride)
        with progress(model, total, f"{desc} (perplexity)", cfg.progress, size):
            r = perplexity(model, data, batch_size=ec.batch_size, window=window, stride=stride)
        return {"ppl": r["ppl"], "nll": r["nll"], "eval_tokens": r["tokens"], "eval_protocol": r["protocol"],
                "eval_window": r["window"] or dc.seq_len, "eval_stride": r["stride"] or dc.seq_len}
    if cfg.model.task == "sequence_classification":
        total = math.ceil(len(data) / ec.batch_size)
        with progress(model, total, desc, cfg.progress, size):
            if cfg.model.num_labels == 1:
                return regression_metrics(model, data, batch_size=ec.batch_size)
            return classification_metrics(model, data, batch_size=ec.batch_size)
    return squad_metrics(model, data, cfg, desc)


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval(cfg: Config) -> None:
    """Fail before any model is loaded when lm-eval tasks are asked for but cannot run."""
    ec = cfg.eval
    if ec.lm_eval_tasks and not lm_eval_available():
        raise ImportError("eval.lm_eval_tasks needs lm-evaluation-harness, an optional dependency that is not "
                          "installed: pip install lm-eval (or set eval.lm_eval_tasks=[])")
    if ec.lm_eval_include_path and not Path(ec.lm_eval_include_path).expanduser().is_dir():
        raise FileNotFoundError(f"eval.lm_eval_include_path={ec.lm_eval_include_path!r} is not a directory (it should "
                                "hold lm-eval task YAML files)")


def lm_eval_task_manager(ec):
    """lm-eval's task index: with eval.lm_eval_include_path, the task YAMLs found there, and lm-eval's own tasks
    only when some requested task is not among them (indexing the ~15k built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    if not ec.lm_eval_include_path:
        return TaskManager()
    path = str(Path(ec.lm_eval_include_path).expanduser())
    local = TaskManager(include_path=path, include_defaults=False)
    if all(t in local.all_tasks for t in ec.lm_eval_tasks):
        return local
    return TaskManager(include_path=path)


def lm_eval_metrics(model, tokenizer, cfg: Config) -> dict:
    """Zero-shot (or few-shot) accuracy on eval.lm_eval_tasks through lm-evaluation-harness (imported lazily): its
    own tasks by name (their data comes from the hub), or tasks defined by YAML files in eval.lm_eval_include_path
    (e.g. `dataset_path: json` with local `data_files`, which runs offline)."""
    ec = cfg.eval
    if not ec.lm_eval_tasks:
        return {}
    require_lm_eval(cfg)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    prefix = None  # lm-eval prefixes contexts with BOS, else EOS; a tokenizer with neither takes the model's own
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        prefix = next((t for t in (getattr(model.config, "bos_token_id", None),
                                   getattr(model.config, "eos_token_id", None)) if isinstance(t, int)), None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ec.batch_size, prefix_token_id=prefix)
    tasks = lm_eval_task_manager(ec)
    unknown = [t for t in ec.lm_eval_tasks if t not in tasks.all_tasks]
    if unknown:
        where = f" or in eval.lm_eval_include_path={ec.lm_eval_include_path!r}" if ec.lm_eval_include_path else ""
        raise ValueError(f"eval.lm_eval_tasks: {unknown} are not lm-eval tasks{where}")
    results = lm_eval.simple_evaluate(model=lm, tasks=list(ec.lm_eval_tasks), num_fewshot=ec.lm_eval_num_fewshot,
                                      limit=ec.lm_eval_limit or None, task_manager=tasks)["results"]
    out, accs = {}, []
    for task, r in results.items():
        for key, value in r.items():
            name, _, _filter = key.partition(",")
            if name in ("acc", "acc_norm", "exact_match", "f1", "mcc") and isinstance(value, (int, float)):
                out[f"lm_eval_{task}_{name}"] = float(value)
        if isinstance(r.get("acc,none"), (int, float)):
            accs.append(float(r["acc,none"]))
    if accs:
        out["lm_eval_mean"] = sum(accs) / len(accs)
    return out


# ---------------------------------------------------------------------------------------------- SQuAD


def squad_metrics(model, feats: D.QAFeatures, cfg: Config, desc: str = "evaluate") -> dict:
    """Exact match / F1 of a QA model on tokenised questions (vtrans.evaluation.qa_metrics), with a progress bar."""
    ec = cfg.eval
    with progress(model, math.ceil(len(feats) / ec.batch_size), f"{desc} (SQuAD)", cfg.progress):
        return qa_metrics(model, feats, ec.batch_size, ec.qa_n_best, ec.qa_max_answer_len)


# ---------------------------------------------------------------------------------------------- the job


def evaluate_all(model, tokenizer, cfg: Config, data, desc: str = "evaluate") -> dict:
    metrics = task_metrics(model, tokenizer, cfg, data, desc)
    if cfg.model.task == "causal_lm":
        metrics.update(lm_eval_metrics(model, tokenizer, cfg))
    return metrics


def run(cfg: Config, out: Path) -> dict:
    t0 = time.perf_counter()
    require_lm_eval(cfg)  # before any model is loaded
    mc = evaluated_model_config(cfg)
    model, tokenizer = load(mc)
    _, held = documents(cfg)
    data = task_data(cfg, tokenizer, held)
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="evaluate")
    metrics = {"model": cfg.model_dir or (cfg.model.name_or_path or f"{cfg.model.package}/{cfg.model.subdir}"),
               "eval_examples": len(held), "flops_seq_len": cfg.budget.flops_seq_len}
    metrics.update(size_metrics(model, cfg.budget.flops_seq_len))
    dense = dense_reference_shape(cfg) if cfg.model_dir else None
    if dense is not None:
        metrics["params_dense"] = int(param_count(dense))
        metrics["flops_dense"] = float(flops_per_token(dense, cfg.budget.flops_seq_len))
        metrics["params_ratio"] = metrics["params"] / metrics["params_dense"]
        metrics["flops_ratio"] = metrics["flops"] / metrics["flops_dense"]
    t_eval = time.perf_counter()
    metrics.update(evaluate_all(model, tokenizer, cfg, data))
    metrics["eval_time_s"] = time.perf_counter() - t_eval
    rows = structure_rows(model, dense)
    if is_main_process():
        metrics.update(write_structure(rows, out, "structure of the evaluated model"))
    logger.structure(rows, "structure of the evaluated model")
    metrics["wall_time_s"] = time.perf_counter() - t0
    set_objective(cfg, metrics)
    logger.summary(metrics)
    logger.finish()
    log.info("evaluate: %s", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics
