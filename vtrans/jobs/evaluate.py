"""The evaluate job (a saved model directory, or the configured model: task metric + parameters + FLOPs), and
what the finetune / export / probe jobs share with it: loading models, the evaluation data, the task metrics
(perplexity; GLUE accuracy / F1 / Matthews or Pearson / Spearman; SQuAD v1.1 exact match / F1; zero-shot tasks
through lm-evaluation-harness) with a progress bar, and size / FLOPs accounting."""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import logging
import math
import re
import string
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import data as D
from ..accounting import flops_per_token, model_numel, param_count
from ..config import Config, ModelConfig
from ..evaluation import classification_metrics, perplexity, regression_metrics
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


def documents(cfg: Config) -> tuple[list, list]:
    """(train documents, evaluation documents). Without data.eval_source the evaluation documents are the prune
    job's held-out split of data.source (same seed, same split); with it, all of data.source trains."""
    dc = cfg.data
    if cfg.model.task == "question_answering":
        train = qa_examples(dc.source, dc)
        held = qa_examples(dc.eval_source, dc) if dc.eval_source else None
        if held is None:
            train, held = _split_list(train, dc.heldout_fraction, dc.seed)
    else:
        docs = D.load_documents(dc.source, text_field=dc.text_field, label_field=dc.label_field)
        if dc.eval_source:
            train = list(docs)
            held = list(D.load_documents(dc.eval_source, text_field=dc.text_field, label_field=dc.label_field))
        else:
            train, held = D.split_documents(docs, dc.heldout_fraction, dc.seed)
    if cfg.data.train_fraction < 1:
        train = D.subsample(train, cfg.data.train_fraction, dc.seed)
    if cfg.eval.max_examples:
        held = held[: cfg.eval.max_examples]
    return train, held


def _split_list(items: list, fraction: float, seed: int) -> tuple[list, list]:
    import random

    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n = max(1, round(len(items) * fraction))
    held = set(idx[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def task_data(cfg: Config, tokenizer, docs: list, training: bool = False):
    """LM token blocks [N, seq_len], ClassificationData, or QA features, for the configured task."""
    dc = cfg.data
    if cfg.model.task == "causal_lm":
        limit = (dc.max_train_blocks if training else dc.max_eval_blocks) or None
        return D.lm_blocks(tokenizer, docs, dc.seq_len, limit)
    if cfg.model.task == "sequence_classification":
        return D.ClassificationData.from_documents(tokenizer, docs, dc.seq_len)
    return qa_features(tokenizer, docs, dc.seq_len, cfg.eval.qa_doc_stride, training)


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
    if cfg.eval.lm_eval_tasks and not lm_eval_available():
        raise ImportError("eval.lm_eval_tasks needs lm-evaluation-harness, an optional dependency that is not "
                          "installed: pip install lm-eval (or set eval.lm_eval_tasks=[])")


def lm_eval_metrics(model, tokenizer, cfg: Config) -> dict:
    """Zero-shot (or few-shot) accuracy on eval.lm_eval_tasks through lm-evaluation-harness (imported lazily)."""
    ec = cfg.eval
    if not ec.lm_eval_tasks:
        return {}
    require_lm_eval(cfg)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ec.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(ec.lm_eval_tasks), num_fewshot=ec.lm_eval_num_fewshot,
                                      limit=ec.lm_eval_limit or None)["results"]
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


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]


def qa_examples(source: str, dc) -> list[QAExample]:
    """SQuAD-layout examples from hf:<name>[:<config>]:<split> or a local .jsonl / .json file."""
    import datasets

    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"bad Hugging Face source {source!r}; expected hf:<dataset>[:<config>]:<split>, "
                             "e.g. hf:rajpurkar/squad:validation")
        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # network, cache, config or split: reported the same way
            raise ValueError(f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
                             f"{type(e).__name__}: {e}") from e
    else:
        path = Path(source).expanduser()
        if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
            raise ValueError(f"question answering source {source!r}: expected hf:<dataset>[:<config>]:<split> or "
                             "an existing .jsonl / .json file with question, context and answers fields")
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    missing = [f for f in (dc.question_field, dc.context_field, dc.answers_field) if f not in ds.column_names]
    if missing:
        raise ValueError(f"{source!r} has no field(s) {missing}; available: {ds.column_names} (set "
                         "data.question_field / data.context_field / data.answers_field)")
    out = []
    for i, row in enumerate(ds):
        ans = row[dc.answers_field]
        texts = list(ans["text"]) if isinstance(ans, dict) else [a["text"] for a in ans]
        starts = list(ans["answer_start"]) if isinstance(ans, dict) else [a["answer_start"] for a in ans]
        out.append(QAExample(str(row.get("id", i)), row[dc.question_field], row[dc.context_field], texts, starts))
    if not out:
        raise ValueError(f"source {source!r} contains no examples")
    return out


@dataclass
class QAFeatures:
    """Tokenised windows of SQuAD examples (HF run_qa layout). Training features carry start/end positions;
    evaluation features carry the offsets of context tokens and the example each window came from."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    start_positions: torch.Tensor | None
    end_positions: torch.Tensor | None
    offsets: list | None
    example_index: list[int]
    examples: list[QAExample]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        if self.start_positions is not None:
            out["start_positions"], out["end_positions"] = self.start_positions, self.end_positions
        return out


def qa_features(tokenizer, examples: list[QAExample], seq_len: int, doc_stride: int, training: bool) -> QAFeatures:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("question answering needs a fast tokenizer (character offsets)")
    stride = min(doc_stride, seq_len // 2)  # question first, the context cut into overlapping windows
    enc = tokenizer([e.question.lstrip() for e in examples], [e.context for e in examples],
                    truncation="only_second", max_length=seq_len, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    sample_map = enc.pop("overflow_to_sample_mapping")
    starts, ends, offsets = [], [], []
    cls_index = 0
    for i, offs in enumerate(enc["offset_mapping"]):
        seq_ids = enc.sequence_ids(i)
        ex = examples[sample_map[i]]
        context_tokens = [j for j, s in enumerate(seq_ids) if s == 1]
        offsets.append([o if seq_ids[j] == 1 else None for j, o in enumerate(offs)])
        if not training:
            continue
        a_start = ex.answer_starts[0] if ex.answer_starts else -1
        a_end = a_start + len(ex.answers[0]) if ex.answers else -1
        first, last = context_tokens[0], context_tokens[-1]
        if a_start < 0 or not (offs[first][0] <= a_start and offs[last][1] >= a_end):
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        s = first
        while s <= last and offs[s][0] <= a_start:
            s += 1
        e = last
        while e >= first and offs[e][1] >= a_end:
            e -= 1
        starts.append(s - 1)
        ends.append(e + 1)
    as_t = lambda k: torch.tensor(enc[k], dtype=torch.long) if k in enc else None  # noqa: E731
    return QAFeatures(as_t("input_ids"), as_t("attention_mask"), as_t("token_type_ids"),
                      torch.tensor(starts) if training else None, torch.tensor(ends) if training else None,
                      None if training else offsets, list(sample_map), examples)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's official normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_answer_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], examples: list[QAExample]) -> dict:
    """Exact match and F1 (fractions; x100 for the usual SQuAD numbers), each the max over the gold answers."""
    em = f1 = 0.0
    for ex in examples:
        pred = predictions.get(ex.id, "")
        golds = ex.answers or [""]
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_answer_score(pred, g) for g in golds)
    n = len(examples)
    return {"exact_match": em / n, "f1": f1 / n, "n": n}


def squad_predictions(start_logits: torch.Tensor, end_logits: torch.Tensor, feats: QAFeatures, n_best: int,
                      max_answer_len: int) -> dict[str, str]:
    """The best-scoring valid span (start <= end, inside the context, at most max_answer_len tokens) per example."""
    best: dict[int, tuple[float, str]] = {}
    for f in range(len(feats)):
        ex_i = feats.example_index[f]
        offs = feats.offsets[f]
        s_log, e_log = start_logits[f], end_logits[f]
        for s in torch.topk(s_log, min(n_best, s_log.numel())).indices.tolist():
            for e in torch.topk(e_log, min(n_best, e_log.numel())).indices.tolist():
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                score = float(s_log[s] + e_log[e])
                if ex_i not in best or score > best[ex_i][0]:
                    ctx = feats.examples[ex_i].context
                    best[ex_i] = (score, ctx[offs[s][0]: offs[e][1]])
    return {ex.id: best.get(i, (0.0, ""))[1] for i, ex in enumerate(feats.examples)}


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode inside, the model's previous training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def squad_metrics(model, feats: QAFeatures, cfg: Config, desc: str = "evaluate") -> dict:
    ec = cfg.eval
    device = next(model.parameters()).device
    starts, ends = [], []
    with progress(model, math.ceil(len(feats) / ec.batch_size), f"{desc} (SQuAD)", cfg.progress), \
            eval_mode(model), torch.no_grad():
        for b in D.batches(feats.tensors(), ec.batch_size, shuffle=False):
            out = model(**{k: v.to(device) for k, v in b.items()})
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
    preds = squad_predictions(torch.cat(starts), torch.cat(ends), feats, ec.qa_n_best, ec.qa_max_answer_len)
    return squad_scores(preds, feats.examples)


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
