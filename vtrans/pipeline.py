"""The named stages every job is built from, each a function with explicit inputs and outputs:

    load -> data -> attach -> warm start -> train -> decide -> materialise -> evaluate -> save

(`jobs/prune.py` runs them all; finetune, evaluate, export and probe use the ones they need). State that must
survive a restart lives in the checkpoint (vtrans.checkpoint), not in these functions."""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import data as D
from .accounting import flops_per_token, model_numel, param_count
from .config import Config, ModelConfig
from .decision import DECISION_FILE, Decision
from .evaluation import (classification_metrics, lm_eval_metrics, perplexity, qa_metrics, regression_metrics)
from .log import rows_from_counts, rows_from_decision
from .masks.attach import MaskedModel, MaskInit, attach_masks
from .masks.decide import Budget, decide as fit_budget, decide_uniform
from .masks.materialize import materialize
from .masks.scoring import score_masks, warm_start as spread_scores
from .models import save_pruned, shape_of, to_stock
from .models.load import load_model, read_model_config
from .strict_json import write as write_json
from .objectives import target_ratio

log = logging.getLogger("vtrans")
FAST_FRACTION = 0.03  # Fast-VTrans trains on about 3 % of the data (the paper)
LOWER_IS_BETTER = ("ppl",)  # objectives where lower is better; every other one is higher-is-better


# ---------------------------------------------------------------------------------------------------------- setup


def output_dir(cfg: Config) -> Path:
    """cfg.output_dir, else the Hydra run directory, else ./outputs/vtrans."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not running under Hydra
        return Path("outputs/vtrans")


def is_main_process() -> bool:
    from .cluster import dist_env

    return dist_env().is_main


# ---------------------------------------------------------------------------------------------------------- load


def dir_model_config(cfg: Config, path: str | Path) -> ModelConfig:
    """The ModelConfig of a saved model directory, with the configured task, labels and dtype."""
    return replace(cfg.model, package="", name_or_path=str(path), subdir="", gguf_file="")


def load(model_cfg: ModelConfig, eager: bool = False, config=None):
    """(model, tokenizer) of a configured model or a saved (pruned) directory, in eval mode."""
    model, tokenizer = load_model(model_cfg, config)
    if eager:  # attention weights are only returned by the eager implementation
        model.set_attn_implementation("eager")
    return model.eval(), tokenizer


def dense_reference_shape(cfg: Config):
    """The configured (dense) model's shape without loading its weights (a meta-device instance); None when its
    config cannot be read (e.g. a hub name on an offline machine)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering
    from transformers import AutoModelForSequenceClassification

    try:
        config = read_model_config(cfg.model)
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


# ---------------------------------------------------------------------------------------------------------- data


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
        if not training and cfg.eval.protocol == "published":
            return D.lm_windows(tokenizer, docs, dc.seq_len, limit)
        return D.lm_blocks(tokenizer, docs, dc.seq_len, limit)
    if cfg.model.task == "sequence_classification":
        return D.ClassificationData.from_documents(tokenizer, docs, dc.seq_len)
    return D.qa_features(tokenizer, docs, dc.seq_len, cfg.eval.qa_doc_stride,
                         (dc.max_train_blocks or None) if training else None)


@dataclass
class Data:
    """A job's tokenised training and evaluation data and how many documents they came from."""
    train: object
    held: object
    train_documents: int
    held_documents: int


def prepare_data(cfg: Config, tokenizer, fast_floor: bool = False) -> Data:
    """The data stage: the documents every job uses (split before tokenising, so the parts never overlap), tokenised.

    With `fast_floor` (Fast-VTrans) training takes FAST_FRACTION of the training documents unless data.train_fraction
    says otherwise, but no fewer documents than give mask.calibration_blocks sequences, the data a one-shot baseline
    calibrates on: 3 % of a small set (5 of 160 sentences) is too little to rank units on, let alone train weights."""
    train_docs, held_docs = documents(cfg)
    if fast_floor and cfg.data.train_fraction == 1.0:
        measured = {}  # the subset returned is the last one measured: its tokenisation is the training data

        def sequences(docs: list) -> int:
            measured["train"] = task_data(cfg, tokenizer, docs, training=True)
            return len(measured["train"])

        n_all = len(train_docs)
        train_docs = D.subsample_at_least(train_docs, FAST_FRACTION, cfg.data.seed, cfg.mask.calibration_blocks,
                                          size=sequences)
        train = measured["train"]
        log.info("Fast-VTrans trains on %d of %d training documents (%.1f %%, %d sequences; at least "
                 "mask.calibration_blocks=%d sequences)", len(train_docs), n_all, 100 * len(train_docs) / n_all,
                 len(train), cfg.mask.calibration_blocks)
    else:
        train = task_data(cfg, tokenizer, train_docs, training=True)
    return Data(train, task_data(cfg, tokenizer, held_docs), len(train_docs), len(held_docs))


def endless(data, batch_size: int, seed: int):
    """Batches over epochs, a new order each epoch, as model-input dicts."""
    for epoch in itertools.count():
        for b in D.batches(data, batch_size, shuffle=True, seed=seed + epoch, drop_last=True):
            yield {"input_ids": b} if isinstance(b, torch.Tensor) else b


def calibration(train, cfg: Config) -> list[dict]:
    """The one-shot scorers' batches: mask.calibration_blocks training blocks (sequences)."""
    bs = cfg.optim.batch_size
    return [b for _, b in zip(range(max(1, cfg.mask.calibration_blocks // bs)), endless(train, bs, cfg.optim.seed))]


# ---------------------------------------------------------------------------------------------------------- masks


def budget_of(cfg: Config) -> Budget:
    return Budget(kind=cfg.budget.kind, target=cfg.budget.target, embeddings=cfg.budget.count_embeddings,
                  seq_len=cfg.budget.flops_seq_len)


def attach(cfg: Config, model) -> MaskedModel:
    """The attach stage: masks over mask.structures, initialised as mask.* says."""
    mask = cfg.mask
    return attach_masks(model, mask.structures, MaskInit(method=mask.method, mu=mask.mu_init, mu_std=mask.mu_std,
                                                         log_sigma2=mask.log_sigma2_init,
                                                         log_sigma2_std=mask.log_sigma2_std, k=mask.k))


def frozen_teacher(cfg: Config, model):
    """A separate frozen teacher when the weights train and something is distilled (VTrans, Fast-VTrans); None when
    the model with its masks off is the teacher (Faster-VTrans: frozen weights, no second copy) or nothing distils."""
    distills = cfg.distill.logit_weight > 0 or cfg.distill.layer_weight > 0
    if cfg.mask.method == "vib" and cfg.mask.variant != "faster" and distills:
        return copy.deepcopy(model).eval().requires_grad_(False)
    return None


def warm_start(cfg: Config, mm: MaskedModel, train) -> float:
    """The warm-start stage: a one-shot ranking (mask.init_from) on the variant's own training data spreads the VIB
    masks' log_sigma2 (mask.init_spread); returns its seconds. A one-shot baseline's scoring is the same call."""
    import time

    t0 = time.perf_counter()
    method = cfg.mask.init_from if cfg.mask.method == "vib" else cfg.mask.method
    score_masks(mm, method, calibration(train, cfg), seed=cfg.optim.seed)
    if cfg.mask.method == "vib":
        spread_scores(mm, cfg.mask.init_spread)
        log.info("masks warm-started from %s scores (spread %g) in %.1f s", method, cfg.mask.init_spread,
                 time.perf_counter() - t0)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------- decide


def iterative_decisions(mm: MaskedModel, budget: Budget, warmup_steps: int, final_ratio: float, every: int,
                        steps: int, uniform: bool = False, multiple_of: int = 1):
    """VTrans prunes iteratively: every `every` steps the units over the scheduled size (ramping from dense to the
    budget over the warm-up) are cut from the training forward (z *= decided), so the remaining units and weights
    learn to do without them before the final decision. The masks are whole on every rank, so every rank decides
    alike."""
    if every <= 0:
        return None
    dense_size = float(budget.size(mm.dense))
    absolute = "flops" if budget.kind == "flops" else "params"

    def on_step(step: int) -> None:
        if step % every or step >= steps:
            return
        ratio = target_ratio(step, warmup_steps, final_ratio)
        if ratio >= 1.0 - 1e-6:
            return
        scheduled = Budget(kind=absolute, target=ratio * dense_size, embeddings=budget.embeddings,
                           seq_len=budget.seq_len)
        if uniform:  # the shapes a uniform export allows, so training sees the final kind of model
            decide_uniform(mm, scheduled)
        else:
            fit_budget(mm, scheduled, monotone=True, multiple_of=multiple_of)
    return on_step


def decide(cfg: Config, mm: MaskedModel, budget: Budget) -> Decision:
    """The decide stage: the kept units that meet the budget (uniform for a stock export)."""
    if cfg.export_uniform:
        return decide_uniform(mm, budget)
    iterative = cfg.mask.method == "vib" and cfg.budget.decide_every > 0
    return fit_budget(mm, budget, monotone=iterative, multiple_of=cfg.budget.multiple_of)


# ---------------------------------------------------------------------------------------------------------- materialise


def materialise(cfg: Config, mm: MaskedModel, decision: Decision, gather=None):
    """The materialise stage: the smaller model (stock classes with export_uniform=true)."""
    pruned = materialize(mm, decision, gather=gather)
    return to_stock(pruned) if cfg.export_uniform else pruned


def check_budget(model, budget: Budget, target: float) -> None:
    """The materialised model's counted parameters against the budget."""
    if budget.kind in ("params_ratio", "params"):
        counted = model_numel(model, embeddings=budget.embeddings)
        if counted > target:
            raise RuntimeError(f"pruned model has {counted:,} parameters, over the budget {target:,.0f}")


# ---------------------------------------------------------------------------------------------------------- evaluate


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


def evaluate(model, tokenizer, cfg: Config, data, desc: str = "evaluate", lm_eval: bool = True) -> dict:
    """The evaluate stage, the one evaluation entry point of every job: the task's own metrics on `data` (see
    task_data): perplexity (with its protocol), accuracy / F1 / Matthews, Pearson / Spearman, SQuAD exact match / F1;
    and, for causal LMs with eval.lm_eval_tasks, zero-shot accuracy through lm-evaluation-harness."""
    ec, dc = cfg.eval, cfg.data
    size = {"params": f"{model_numel(model) / 1e6:.2f}M"}
    if cfg.model.task == "causal_lm":
        window, stride = dc.eval_window or None, dc.eval_stride or None
        total = _ppl_batches(data, ec.batch_size, window, stride)
        with progress(model, total, f"{desc} (perplexity)", cfg.progress, size):
            r = perplexity(model, data, batch_size=ec.batch_size, window=window, stride=stride)
        protocol = "published" if ec.protocol == "published" else r["protocol"]  # its own windows, scored as blocks
        metrics = {"ppl": r["ppl"], "nll": r["nll"], "eval_tokens": r["tokens"], "eval_protocol": protocol,
                   "eval_window": r["window"] or dc.seq_len, "eval_stride": r["stride"] or dc.seq_len}
        if lm_eval:
            metrics.update(lm_eval_metrics(model, tokenizer, ec))
        return metrics
    if cfg.model.task == "sequence_classification":
        with progress(model, math.ceil(len(data) / ec.batch_size), desc, cfg.progress, size):
            if cfg.model.num_labels == 1:
                return regression_metrics(model, data, batch_size=ec.batch_size)
            return classification_metrics(model, data, batch_size=ec.batch_size)
    with progress(model, math.ceil(len(data) / ec.batch_size), f"{desc} (SQuAD)", cfg.progress, size):
        return qa_metrics(model, data, ec.batch_size, ec.qa_n_best, ec.qa_max_answer_len)


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


# ---------------------------------------------------------------------------------------------------------- save


def save_model(model, tokenizer, model_dir: Path, decision: Decision | None = None) -> None:
    """The save stage (rank 0): a vtrans pruned model in its self-contained format (modeling files + auto_map), a
    stock model with save_pretrained; the tokenizer; the decision beside it (read by the probe job)."""
    from .models import is_pruned

    model_dir = Path(model_dir)
    if is_pruned(model.config):
        save_pruned(model, model_dir)
    else:
        model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if decision is not None:
        write_json(model_dir / DECISION_FILE, decision.record())


def write_metrics(out: Path, metrics: dict) -> Path:
    """<out>/metrics.json as strict JSON: non-finite values (a diverged perplexity, an inf loss) written as null and
    their keys listed under `non_finite_keys` (present, maybe empty, in every metrics.json)."""
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / "metrics.json", metrics, flag=True, indent=2, sort_keys=True)


def report(cfg: Config, out: Path, metrics: dict, logger, artifacts: dict | None = None) -> dict:
    """The report stage, last in every job: the objective, metrics.json (rank 0), the W&B summary, the artifacts
    (`artifacts`: kind -> file or directory, e.g. the model and its decision; metrics.json is added) and the end of
    the W&B run."""
    metrics.setdefault("job", cfg.job)
    set_objective(cfg, metrics)
    if is_main_process():
        write_metrics(out, metrics)
    logger.summary(metrics)
    logger.artifacts({**(artifacts or {}), "metrics": out / "metrics.json"})
    logger.finish()
    return metrics


def set_objective(cfg: Config, metrics: dict) -> None:
    """metrics["objective"] = the primary metric of the job's resulting model (eval.primary, else the task's own:
    ppl, accuracy, pearson for regression, f1 for QA); "objective_name" names it, "objective_mode" says min/max."""
    primary = cfg.eval.primary or default_primary(cfg, metrics)
    for key in (f"{primary}_pruned", f"{primary}_after", primary):
        if key in metrics and isinstance(metrics[key], (int, float)):
            metrics["objective"] = float(metrics[key])
            metrics["objective_name"] = key
            metrics["objective_mode"] = "min" if primary in LOWER_IS_BETTER else "max"
            return
    if "objective" in metrics and "objective_name" not in metrics:  # a job's own choice, named after its key
        name = next((k for k, v in metrics.items() if k != "objective" and v == metrics["objective"]), "objective")
        metrics["objective_name"] = name
        metrics["objective_mode"] = "min" if name.startswith(LOWER_IS_BETTER) else "max"


def default_primary(cfg: Config, metrics: dict) -> str:
    if cfg.model.task == "causal_lm":
        return "ppl"
    if cfg.model.task == "question_answering":
        return "f1"
    if any(k.startswith("pearson") for k in metrics) and not any(k.startswith("accuracy") for k in metrics):
        return "pearson"
    return "accuracy"
