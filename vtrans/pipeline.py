"""The named stages every job is built from, each a function with explicit inputs and outputs:

    load -> data -> attach -> warm start -> train -> decide -> materialise -> evaluate -> save

(`jobs/prune.py` runs them all; finetune, evaluate, export and probe use the ones they need). State that must
survive a restart lives in the checkpoint (vtrans.checkpoint), not in these functions."""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import cache, data as D, teacher
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


Dense = Callable[[], tuple]  # () -> the dense (model, tokenizer): called only when teacher samples must be drawn


def source_documents(cfg: Config, source: str, dense: Dense | None = None) -> D.Corpus:
    """The documents of one configured source: read (vtrans.data), or for teacher:N sampled from the dense model
    (`dense()`, called only when the samples are not cached yet) and cached."""
    dc = cfg.data
    if not teacher.is_teacher(source):
        return D.load_documents(source, text_field=dc.text_field, label_field=dc.label_field)
    if dense is None:
        raise ValueError(f"{source!r}: this job has no dense model to sample teacher sequences from")
    from .cluster import dist_env

    sampling = teacher.Sampling(model=cache.model_identity(cfg.model), n=teacher.parse(source),
                                length=dc.teacher_length or dc.seq_len, temperature=dc.teacher_temperature,
                                seed=dc.seed, batch_size=dc.teacher_batch_size, start=dc.teacher_start)
    return teacher.documents(source, sampling, dc.cache_dir, dense, is_main=dist_env().local_rank == 0,
                             progress=cfg.progress and is_main_process())


def loader(model_cfg: ModelConfig) -> Dense:
    """A Dense callable that loads the configured model on first use (jobs that do not hold the dense model)."""
    held: list = []

    def dense():
        if not held:
            held.append(load(model_cfg))
        return held[0]
    return dense


def documents(cfg: Config, train_fraction: float | None = None, dense: Dense | None = None) -> tuple[list, list]:
    """(train documents, evaluation documents) of data.source, for every job alike. Without data.eval_source the
    evaluation documents are a held-out split of data.source (data.folds / heldout_fraction, same seed); with it,
    all of data.source trains. `train_fraction` (default data.train_fraction) subsamples the training part.
    `dense` gives the dense model when data.source is teacher:N (see source_documents)."""
    dc = cfg.data
    if cfg.model.task == "question_answering":  # held-out questions never share an article / passage with training
        train = qa_examples(dc.source, dc)
        if dc.eval_source:
            held = qa_examples(dc.eval_source, dc)
        else:
            train, held = D.split_qa_examples(train, dc.heldout_fraction, dc.seed)
    else:
        docs = source_documents(cfg, dc.source, dense)
        if dc.eval_source:
            train = list(docs)
            held = list(source_documents(cfg, dc.eval_source))
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


@dataclass
class Data:
    """A job's tokenised training and evaluation data and how many documents they came from; `sources` describes
    each training source (source, weight, documents, blocks it gave, sequences it has in the training data)."""
    train: object
    held: object
    train_documents: int
    held_documents: int
    sources: list[dict] = field(default_factory=list)


def prepare_data(cfg: Config, tokenizer, fast_floor: bool = False, dense: Dense | None = None) -> Data:
    """The data stage: the documents every job uses (split before tokenising, so the parts never overlap), tokenised;
    with data.mix, the training sequences of each source mixed by weight (see mixed_training_data).

    With `fast_floor` (Fast-VTrans) training takes FAST_FRACTION of the training documents unless data.train_fraction
    says otherwise, but no fewer documents than give mask.calibration_blocks sequences, the data a one-shot baseline
    calibrates on: 3 % of a small set (5 of 160 sentences) is too little to rank units on, let alone train weights.
    `dense` gives the dense model for teacher:N sources (called only when their samples are not cached)."""
    if cfg.data.mix:
        train_docs, held_docs = documents(cfg, train_fraction=1.0, dense=dense)
        train, sources = mixed_training_data(cfg, tokenizer, train_docs, fast_floor, dense)
        return Data(train, task_data(cfg, tokenizer, held_docs), sum(s["documents"] for s in sources),
                    len(held_docs), sources)
    train_docs, held_docs = documents(cfg, dense=dense)
    if fast_floor and cfg.data.train_fraction == 1.0:
        n_all = len(train_docs)
        train_docs, train = _fast_subset(cfg, tokenizer, train_docs, cfg.mask.calibration_blocks,
                                         lambda docs: task_data(cfg, tokenizer, docs, training=True))
        log.info("Fast-VTrans trains on %d of %d training documents (%.1f %%, %d sequences; at least "
                 "mask.calibration_blocks=%d sequences)", len(train_docs), n_all, 100 * len(train_docs) / n_all,
                 len(train), cfg.mask.calibration_blocks)
    else:
        train = task_data(cfg, tokenizer, train_docs, training=True)
    source = {"source": cfg.data.source, "weight": 1.0, "documents": len(train_docs), "blocks": len(train),
              "sequences": len(train)}
    return Data(train, task_data(cfg, tokenizer, held_docs), len(train_docs), len(held_docs), [source])


def _fast_subset(cfg: Config, tokenizer, docs: list, minimum: int, tokenise) -> tuple[list, object]:
    """Fast-VTrans's documents (FAST_FRACTION, grown to `minimum` sequences) and their tokenisation."""
    measured = {}  # the subset returned is the last one measured: its tokenisation is the training data

    def sequences(subset: list) -> int:
        measured["train"] = tokenise(subset)
        return len(measured["train"])

    docs = D.subsample_at_least(docs, FAST_FRACTION, cfg.data.seed, minimum, size=sequences)
    return docs, measured["train"]


def mixed_training_data(cfg: Config, tokenizer, source_train: list, fast_floor: bool = False,
                        dense: Dense | None = None) -> tuple[torch.Tensor, list[dict]]:
    """The training blocks of data.mix: each source's documents (data.source's training split; teacher:N sampled or
    read from the cache) cut into data.seq_len blocks on their own, then mixed by weight (D.mix_blocks; at most
    data.max_train_blocks rows when set). data.train_fraction, or Fast-VTrans's share with its floor of
    mask.calibration_blocks sequences (split over the sources by weight), applies to every source."""
    dc = cfg.data
    total_weight = sum(m.weight for m in dc.mix)
    parts, sources = [], []
    for entry in dc.mix:
        docs = list(source_train) if entry.source == dc.source else list(source_documents(cfg, entry.source, dense))
        n_all = len(docs)

        def tokenise(subset: list) -> torch.Tensor:
            return D.lm_blocks(tokenizer, subset, dc.seq_len)

        if fast_floor and dc.train_fraction == 1.0:
            minimum = math.ceil(cfg.mask.calibration_blocks * entry.weight / total_weight)
            docs, blocks = _fast_subset(cfg, tokenizer, docs, minimum, tokenise)
        else:
            if dc.train_fraction < 1:
                docs = D.subsample(docs, dc.train_fraction, dc.seed)
            blocks = tokenise(docs)
        parts.append(blocks)
        sources.append({"source": entry.source, "weight": entry.weight, "documents": len(docs),
                        "documents_available": n_all, "blocks": int(blocks.shape[0])})
    train = D.mix_blocks(parts, [m.weight for m in dc.mix], dc.seed, dc.max_train_blocks)
    for src, entry in zip(sources, dc.mix):
        src["sequences"] = max(1, round(entry.weight / total_weight * train.shape[0]))
        log.info("training mixture: %s, weight %g: %d of %d documents, %d blocks, %d sequences in the mixture",
                 src["source"], src["weight"], src["documents"], src["documents_available"], src["blocks"],
                 src["sequences"])
    return train, sources


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
        metrics = {"ppl": r["ppl"], "nll": r["nll"], "eval_tokens": r["tokens"], "eval_protocol": r["protocol"],
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


def domain_data(cfg: Config, tokenizer) -> dict[str, torch.Tensor]:
    """The cross-domain evaluation data (eval.domains): per domain, eval.domain_blocks data.seq_len-token blocks
    evenly spaced over the whole source (D.spread_blocks), so the sample covers every part of it."""
    dc = cfg.data
    out = {}
    if cfg.eval.domains and cfg.model.task != "causal_lm":
        log.info("eval.domains skipped: cross-domain perplexity needs a causal LM (model.task=%s)", cfg.model.task)
        return out
    for name, source in cfg.eval.domains.items():
        docs = D.load_documents(source, text_field=dc.text_field, label_field=None)
        out[name] = D.spread_blocks(D.lm_blocks(tokenizer, docs, dc.seq_len), cfg.eval.domain_blocks)
    return out


PERPLEXITY_VERSION = 1  # part of the dense-perplexity cache key: bump when the perplexity computation changes


def evaluate_dense(model, tokenizer, cfg: Config, data, desc: str = "dense", lm_eval: bool = True) -> dict:
    """evaluate() of the configured dense model (`model` must be it, masks off), its perplexity read from / written to
    the cache (vtrans.cache, in data.cache_dir) when eval.cache_dense is on: keyed by the model's files, the exact
    token blocks and the protocol, so every job on the same model and data evaluates the dense model once."""
    if not (cfg.eval.cache_dense and cfg.model.task == "causal_lm"):
        return evaluate(model, tokenizer, cfg, data, desc, lm_eval)
    record = {"model": cache.model_identity(cfg.model), "blocks": cache.digest(data), "window": cfg.data.eval_window,
              "stride": cfg.data.eval_stride, "version": PERPLEXITY_VERSION}
    path = cache.entry(cfg.data.cache_dir, "perplexity", record)
    metrics = cache.read(path, record)
    if metrics is None:
        metrics = evaluate(model, tokenizer, cfg, data, desc, lm_eval=False)
        if is_main_process():
            cache.write(path, record, metrics)
    else:
        log.info("%s: perplexity %.3f read from %s", desc, metrics["ppl"], path)
    if lm_eval:
        metrics = {**metrics, **lm_eval_metrics(model, tokenizer, cfg.eval)}
    return metrics


def evaluate_domains(model, cfg: Config, domains: dict[str, torch.Tensor], suffix: str, dense: bool = False) -> dict:
    """ppl_<name>_<suffix> and nll_<name>_<suffix> of `model` on each cross-domain evaluation set (`dense`: the model
    is the configured dense one, see evaluate_dense)."""
    metrics = {}
    for name, blocks in domains.items():
        if dense:
            r = evaluate_dense(model, None, cfg, blocks, f"{suffix} {name}", lm_eval=False)
        else:
            r = evaluate(model, None, cfg, blocks, f"{suffix} {name}", lm_eval=False)
        metrics[f"ppl_{name}_{suffix}"], metrics[f"nll_{name}_{suffix}"] = r["ppl"], r["nll"]
        metrics[f"eval_tokens_{name}"] = r["eval_tokens"]
    return metrics


def ratio_metrics(metrics: dict, domains, new: str, ref: str, suffix: str = "") -> dict:
    """Perplexity ratios of model `new` to model `ref` (metric suffixes, e.g. pruned / dense): ppl_ratio_<domain>
    per cross-domain set, ppl_ratio_calibration_domain (the held-out split of data.source, key ppl_<new>) and
    ppl_ratio_cross_domain, the geometric mean of the per-domain ratios. `suffix` is appended to every key."""
    out = {}
    if f"ppl_{new}" in metrics and f"ppl_{ref}" in metrics:
        out[f"ppl_ratio_calibration_domain{suffix}"] = metrics[f"ppl_{new}"] / metrics[f"ppl_{ref}"]
    ratios = [metrics[f"ppl_{d}_{new}"] / metrics[f"ppl_{d}_{ref}"] for d in domains]
    for d, r in zip(domains, ratios):
        out[f"ppl_ratio_{d}{suffix}"] = r
    if ratios:
        out[f"ppl_ratio_cross_domain{suffix}"] = geometric_mean(ratios)
    return out


def geometric_mean(values) -> float:
    values = list(values)
    if any(v <= 0 for v in values):
        raise ValueError(f"a geometric mean needs positive values, got {values}")
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


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
        (model_dir / DECISION_FILE).write_text(json.dumps(decision.record()))


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
