"""The named stages every job is built from, each a function with explicit inputs and outputs:

    claim the output -> setup -> load -> data -> attach -> warm start -> train -> decide -> materialise -> save ->
    evaluate

(`jobs/prune.py` runs them all; finetune, evaluate, export and probe use the ones they need). State that must
survive a restart lives in the checkpoint (vtrans.checkpoint), not in these functions. The stages fail early on what
they can know early (the output directory before any model loads, the family's conflicts from the model's config
alone) and obey a stop signal: loading and tokenising end at once, every forward call of a model under `progress` /
`stop_checks` checks the stop flag."""
from __future__ import annotations

import contextlib
import copy
import errno
import functools
import itertools
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from hydra.experimental.callback import Callback

from . import cache, evaluation, teacher
from . import checkpoint as ckpt
from . import data as D
from .accounting import flops_per_token, model_numel, param_count
from .config import (TRAINING_FIELDS, Config, ModelConfig, fingerprint_changes, result_fingerprint,
                     training_changes, training_fingerprint)
from .decision import DECISION_FILE, Decision
from .evaluation import (classification_metrics, lm_eval_metrics, perplexity, qa_metrics, regression_metrics)
from .log import rows_from_counts
from .masks.attach import MaskedModel, MaskInit, attach_masks
from .masks.compensate import compensate as refit_outputs
from .masks.decide import Budget, decide as fit_budget, decide_uniform, uniform_conflicts
from .masks.materialize import materialize
from .masks.scoring import score_masks, warm_start as spread_scores
from .models import family_of, save_pruned, shape_of, to_stock
from .models.load import TASK_HEADS, load_model, read_model_config
from .strict_json import write as write_json
from .objectives import target_ratio

log = logging.getLogger("vtrans")
FAST_FRACTION = 0.03  # Fast-VTrans trains on about 3 % of the data (the paper)
LOWER_IS_BETTER = ("ppl",)  # objectives where lower is better; every other one is higher-is-better
SHARD_SIZE = "5GB"  # saved models are sharded safetensors files of at most this size (a 7B model: 3 files)


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


def check_world_size(cfg: Config, world: int) -> None:
    """What the number of processes decides, checked before any model loads: several processes train only under
    DeepSpeed, and every micro-batch is split in equal shares over the ranks (so optim.batch_size, and
    finetune.batch_size for job=finetune, must divide by the world size; optim.grad_accum micro-batches make a step)."""
    if world <= 1:
        return
    trains = cfg.job == "finetune" or (cfg.job == "prune" and cfg.mask.method == "vib")
    if trains and not cfg.deepspeed.enabled:
        raise ValueError(f"this job runs as {world} processes but deepspeed.enabled=false; choose a DeepSpeed config "
                         "(e.g. deepspeed=zero2 or deepspeed=zero3) or run a single process")
    key, batch = ("finetune.batch_size", cfg.finetune.batch_size) if cfg.job == "finetune" else \
        ("optim.batch_size", cfg.optim.batch_size)
    if trains and batch % world:
        raise ValueError(f"{key}={batch} cannot be split over {world} ranks (each rank trains on an equal share of "
                         f"every micro-batch; the global batch is {key} x optim.grad_accum={cfg.optim.grad_accum}); "
                         f"use a multiple of {world}, e.g. {key}={world * -(-batch // world)}")


def setup(cfg: Config):
    """The setup stage: this job's processes and device (vtrans.engine.Processes): `device` (auto: cuda:<LOCAL_RANK>
    when CUDA is present), and with several processes the process group (deepspeed.timeout_minutes)."""
    from .engine import processes

    return processes(cfg.device, cfg.deepspeed.timeout_minutes)


# ---------------------------------------------------------------------------------------------------------- claim

RUN_RECORD = "run.json"  # the config of the run whose results the output directory holds
RESULTS = ("metrics.json", "model")  # what a (finished or stopped) run leaves that another config must not replace
# what a run writes in its output directory: moved together when checkpoint.resume=false sets an earlier run aside
RUN_FILES = (RUN_RECORD, "metrics.json", "model", "structure.csv", "structure.png", "probe.csv", "probe.json",
             "probe.png", "wandb")
PREVIOUS = "previous"  # <output dir>/previous/<time>/: earlier runs set aside


class OutputConflict(FileExistsError):
    """The output directory holds the results or checkpoints of a run with another config."""


def _read_record(out: Path) -> dict | None:
    try:
        return json.loads((out / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _write_record(out: Path, cfg: Config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_RECORD}.tmp"
    record = {"job": cfg.job, "config": result_fingerprint(cfg), "training": training_fingerprint(cfg)}
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(out / RUN_RECORD)


def output_conflicts(cfg: Config, out: Path) -> str:
    """Why running `cfg` into `out` would resume or replace another config's run ("" when it would not): its latest
    checkpoint records another training fingerprint; or its metrics.json (a finished run) another result fingerprint
    (run.json); or its model/ without metrics.json (a run stopped after saving it) another training fingerprint, so
    that evaluation settings may change before the rerun; or results of unknown config. Names what is there and
    each changed field (old -> new)."""
    held, changes, unknown = [], [], []
    checkpointer = ckpt.Checkpointer.from_config(cfg.checkpoint, out)
    saved = checkpointer.saved_fingerprint()
    if saved is not None:
        path, old = saved
        if cfg.job not in TRAINING_FIELDS:
            return (f"{checkpointer.root} holds the training checkpoints of another job (latest {path.name}); "
                    f"job={cfg.job} would write its results over that run's")
        if old:
            found = training_changes(old, training_fingerprint(cfg))
            if found:
                held.append(f"checkpoint {path}")
                changes += found
    present = [f"{name}/" if (out / name).is_dir() else name for name in RESULTS if (out / name).exists()]
    if present:
        record = _read_record(out)
        if record is None:
            unknown = present
        else:
            finished = (out / "metrics.json").exists()
            if not finished and cfg.job in TRAINING_FIELDS and record.get("training"):
                found = training_changes(record["training"], training_fingerprint(cfg))
            else:
                found = fingerprint_changes(record.get("config", {}), result_fingerprint(cfg))
            if found:
                held += present
                changes += [c for c in found if c not in changes]
    if unknown:
        return f"{out} holds {' and '.join(unknown)} of a run whose config is unknown (no {RUN_RECORD})"
    if changes:
        return f"{out} holds {', '.join(held)} of a run with another config; changed: {'; '.join(changes)}"
    return ""


def set_aside(cfg: Config, out: Path, extra: tuple = ()) -> Path | None:
    """Move an earlier run's files (RUN_FILES and `extra` names in `out`, and its checkpoints) to
    <out>/previous/<time>/; checkpoints kept outside `out` (checkpoint.dir) move beside themselves. Returns where."""
    import time

    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints"
    names = [n for n in (*RUN_FILES, *extra) if (out / n).exists()]
    inside = root.exists() and root.resolve().is_relative_to(out.resolve())
    if not names and not root.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out / PREVIOUS / stamp
    for k in itertools.count(1):
        if not dest.exists():
            break
        dest = out / PREVIOUS / f"{stamp}-{k}"
    dest.mkdir(parents=True)
    for name in names:
        (out / name).replace(dest / name)
    elsewhere = ""
    if root.exists():
        if inside:
            target = dest / root.resolve().relative_to(out.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
        else:
            target = root.with_name(f"{root.name}.previous-{dest.name}")
            elsewhere = f" (its checkpoints to {target})"
        root.replace(target)
    log.warning("checkpoint.resume=false: the earlier run in %s was moved to %s%s; this run starts afresh", out, dest,
                elsewhere)
    return dest


def claim_output(cfg: Config, out: Path, extra: tuple = ()) -> None:
    """The first stage of every job, before any model loads: the output directory must not hold another config's
    run. With checkpoint.resume=true (default) a run of the same config resumes / is redone, and one of another
    config is an error naming the differing fields (old -> new); with checkpoint.resume=false any earlier run there is
    moved aside (`set_aside`) and this one starts afresh. Rank 0 then records this run's config in run.json."""
    main = is_main_process()
    if cfg.checkpoint.resume:
        problem = output_conflicts(cfg, out)
        if problem:
            raise OutputConflict(
                f"refusing to resume or overwrite another run: {problem}. Choose another output_dir "
                "(hydra.run.dir), or set checkpoint.resume=false to move the earlier run to "
                f"{out / PREVIOUS}/<time>/ and start afresh")
    elif main:
        set_aside(cfg, out, extra)
    if main:
        _write_record(out, cfg)


def _hydra_output_dir(config) -> Path | None:
    from omegaconf import OmegaConf

    if config.get("output_dir"):
        return Path(config.output_dir)
    run_dir = OmegaConf.select(config, "hydra.run.dir")
    return Path(run_dir) if run_dir else None


class ClaimOutputCallback(Callback):
    """`claim_output` of a single run before Hydra writes .hydra/ and opens its log in the run directory, so that a
    refused run (exit code 1, the reason on stderr) leaves an earlier run's .hydra/ and log intact, and
    checkpoint.resume=false sets them aside too (the job claims again; by then nothing is left to move)."""

    def on_run_start(self, config, **kwargs) -> None:
        from omegaconf import open_dict

        from .config import load_config

        try:
            out = _hydra_output_dir(config)
            task = copy.deepcopy(config)
            with open_dict(task):
                del task["hydra"]  # what the job is given: hydra.job.* resolves only in the job
            cfg = load_config(task)
        except Exception as e:  # noqa: BLE001 - e.g. ${hydra:...} values resolve only in the job: it claims there
            log.debug("output claim deferred to the job: %s", e)
            return
        if out is None or not out.exists():
            return
        if cfg.checkpoint.resume:
            try:
                claim_output(cfg, out)
            except OutputConflict as e:  # Hydra turns a callback's exceptions into warnings and goes on
                raise SystemExit(f"Error: {e}") from e
        elif is_main_process():
            set_aside(cfg, out, extra=(".hydra", *(p.name for p in out.glob("*.log"))))


# ---------------------------------------------------------------------------------------------------------- load


def dir_model_config(cfg: Config, path: str | Path) -> ModelConfig:
    """The ModelConfig of a saved model directory, with the configured task, labels and dtype."""
    return replace(cfg.model, package="", name_or_path=str(path), subdir="", gguf_file="")


def sharding(cfg: Config, procs):
    """How this job builds its models: sharded (vtrans.engine.ShardedBuild) under ZeRO-3, where no rank may hold the
    model whole; None otherwise."""
    if cfg.deepspeed.enabled and cfg.deepspeed.stage == 3:
        from .engine import ShardedBuild

        return ShardedBuild(cfg, procs)
    return None


def read_config(cfg: Config, model_cfg: ModelConfig | None = None):
    """The load stage's first half: the model's config alone (no weights), checked against what its family decides
    (read_model_config: the family and its task heads; here: a uniform stock export of the masked structures), so
    such conflicts fail before any data is read or any weights load."""
    model_cfg = model_cfg or cfg.model
    with ckpt.abortable():
        config = read_model_config(model_cfg)
    if cfg.export_uniform and cfg.job == "prune":
        family = family_of(config)
        head = TASK_HEADS[model_cfg.task]
        if head not in family.stock_models:
            raise ValueError(f"export_uniform=true: stock {family.name} models have no {model_cfg.task} class; "
                             "use export_uniform=false")
        conflict = uniform_conflicts(family, cfg.mask.structures)
        if conflict:
            raise ValueError(f"export_uniform=true with mask.structures={list(cfg.mask.structures)}: {conflict}")
    return config


def load(model_cfg: ModelConfig, eager: bool = False, config=None, device=None, sharded=None):
    """(model, tokenizer) of a configured model or a saved (pruned) directory, in eval mode, on `device`; with
    `sharded` (see `sharding`) built partitioned over the ranks (its partitions already on the device). A stop signal
    while loading ends the job at once (nothing to save yet)."""
    with ckpt.abortable():
        model, tokenizer = load_model(model_cfg, config, sharded)
    if eager:  # attention weights are only returned by the eager implementation
        model.set_attn_implementation("eager")
    if device is not None and sharded is None:
        model.to(device)
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
        with ckpt.abortable():  # reading: nothing to save
            return D.load_documents(source, text_field=dc.text_field, label_field=dc.label_field)
    if dense is None:
        raise ValueError(f"{source!r}: this job has no dense model to sample teacher sequences from")
    from .cluster import dist_env

    sampling = teacher.Sampling(model=cache.model_identity(cfg.model, dc.cache_dir), n=teacher.parse(source),
                                length=dc.teacher_length or dc.seq_len, temperature=dc.teacher_temperature,
                                seed=dc.seed, batch_size=dc.teacher_batch_size, start=dc.teacher_start,
                                top_p=dc.teacher_top_p)
    with ckpt.abortable():  # sampling: a stop ends the job at once (the samples are cached only when complete)
        return teacher.documents(source, sampling, dc.cache_dir, dense, is_main=dist_env().local_rank == 0,
                                 progress=cfg.progress and is_main_process())


def loader(model_cfg: ModelConfig, device=None) -> Dense:
    """A Dense callable that loads the configured model whole on first use, on `device` (jobs that do not hold the
    dense model, or hold it partitioned over the ranks: a sharded model cannot sample on one rank)."""
    held: list = []

    def dense():
        if not held:
            held.append(load(model_cfg, device=device))
        return held[0]
    return dense


def documents(cfg: Config, train_fraction: float | None = None, dense: Dense | None = None) -> tuple[list, list]:
    """(train documents, evaluation documents) of data.source, for every job alike. Without data.eval_source the
    evaluation documents are a held-out split of data.source (data.folds / heldout_fraction, same seed); with it,
    all of data.source trains. `train_fraction` (default data.train_fraction) subsamples the training part.
    `dense` gives the dense model when data.source is teacher:N (see source_documents)."""
    with ckpt.abortable():  # reading, sampling and splitting: nothing to save yet
        return _documents(cfg, train_fraction, dense)


def _documents(cfg: Config, train_fraction: float | None, dense: Dense | None) -> tuple[list, list]:
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
    with ckpt.abortable():  # tokenising: nothing to save
        return _task_data(cfg, tokenizer, docs, training)


def _task_data(cfg: Config, tokenizer, docs: list, training: bool):
    dc = cfg.data
    if cfg.model.task == "causal_lm":
        train_limit = dc.max_train_blocks or (dc.train_tokens // dc.seq_len)
        limit = (train_limit if training else dc.max_eval_blocks) or None
        if not training and cfg.eval.protocol == "published":
            return D.lm_windows(tokenizer, docs, dc.seq_len, limit)
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


def prepare_data(cfg: Config, tokenizer, fast_floor: bool = False, procs=None, dense: Dense | None = None) -> Data:
    """The data stage: the documents every job uses (split before tokenising, so the parts never overlap), tokenised;
    with data.mix, the training sequences of each source mixed by weight (see mixed_training_data).

    With `fast_floor` (Fast-VTrans) training takes FAST_FRACTION of the training documents unless data.train_fraction
    says otherwise, but no fewer documents than give mask.calibration_blocks sequences, the data a one-shot baseline
    calibrates on: 3 % of a small set (5 of 160 sentences) is too little to rank units on, let alone train weights.

    Causal-LM blocks are tokenised once (data.cache): rank 0 builds them into the token cache, every rank (and every
    later job with the same data, tokenizer and split) memory-maps them; `data.streaming` reads an hf: source as a
    stream up to data.train_tokens. `dense` gives the dense model for teacher:N sources (called only when their
    samples are not cached, and only by the process that builds the blocks)."""
    if cfg.model.task != "causal_lm" or not cfg.data.cache:
        return _tokenised(cfg, tokenizer, fast_floor, dense)
    blocks = D.TokenCache(Path(cfg.data.cache_dir or D.default_cache_dir()) / "tokens")
    key = blocks.key(token_cache_fields(cfg, tokenizer, fast_floor, procs))
    hit = blocks.load(key)
    # every rank takes the same branch: a rank that finds the entry rank 0 has just written must still meet its barrier
    missing = procs.any(hit is None)[0] if procs is not None else hit is None
    if missing:
        if (procs is None or procs.is_main) and hit is None:
            built = _tokenised(cfg, tokenizer, fast_floor, dense)
            blocks.save(key, {"train": built.train, "held": built.held},
                        {"train_documents": built.train_documents, "held_documents": built.held_documents,
                         "sources": built.sources})
            log.info("token blocks cached in %s (%d train, %d held-out blocks)", blocks.root / key,
                     len(built.train), len(built.held))
        if procs is not None:
            procs.barrier()
        hit = blocks.load(key)
        if hit is None:
            raise RuntimeError(f"the token cache {blocks.root / key} was not written (is data.cache_dir shared by all "
                               "processes of the job?)")
    parts, meta = hit
    return Data(parts["train"], parts["held"], meta["train_documents"], meta["held_documents"],
                meta.get("sources", []))


def token_cache_fields(cfg: Config, tokenizer, fast_floor: bool, procs=None) -> dict:
    """Everything that decides a job's token blocks: the data settings, what the sources hold (teacher samples: the
    dense model they come from, see model_identity), the tokenizer."""
    import hashlib

    data = {k: v for k, v in dataclass_values(cfg.data).items() if k not in ("cache", "cache_dir")}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # its truncation / padding state changes with every call: not part of what it is
        spec = json.dumps({k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")},
                          sort_keys=True)
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    sources = cfg.data.training_sources()
    return {"data": data, "source": D.source_identity(cfg.data.source),
            "eval_source": D.source_identity(cfg.data.eval_source), "max_examples": cfg.eval.max_examples,
            "mix": [D.source_identity(s) for s in sources],
            "teacher_model": model_identity(cfg, procs) if any(map(teacher.is_teacher, sources)) else None,
            "eval_protocol": cfg.eval.protocol,  # "published" cuts the held-out text into its own windows
            "fast_floor": [FAST_FRACTION, cfg.mask.calibration_blocks] if fast_floor else None,
            "tokenizer": [hashlib.sha256(spec.encode()).hexdigest(), tokenizer.eos_token_id, tokenizer.sep_token_id],
            "version": 2}


def model_identity(cfg: Config, procs=None) -> str:
    """cache.model_identity of the configured model. With several processes (`procs`; every rank must call this, it
    meets a barrier) the first process of each machine (LOCAL_RANK 0) reads the model's files for their digests while
    the others wait, then every rank reads the digests it memoised: a 7B checkpoint is read once per machine on its
    first job, not by all its ranks at once (about 35 s each, contending for the same disk)."""
    if procs is not None and procs.distributed:
        from .cluster import dist_env

        if dist_env().local_rank == 0:
            cache.model_identity(cfg.model, cfg.data.cache_dir)
        procs.barrier()
    return cache.model_identity(cfg.model, cfg.data.cache_dir)


def dataclass_values(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


def _tokenised(cfg: Config, tokenizer, fast_floor: bool, dense: Dense | None = None) -> Data:
    dc = cfg.data
    if dc.streaming:  # the evaluation text is its own source; the training stream is read up to train_tokens
        limit = dc.max_train_blocks or (dc.train_tokens // dc.seq_len) or None
        train, n_train = D.lm_blocks_streamed(tokenizer, D.stream_documents(dc.source, dc.text_field), dc.seq_len,
                                              limit)
        held_docs = list(D.load_documents(dc.eval_source, text_field=dc.text_field, label_field=dc.label_field))
        if cfg.eval.max_examples:
            held_docs = held_docs[: cfg.eval.max_examples]
        source = {"source": dc.source, "weight": 1.0, "documents": n_train, "blocks": len(train),
                  "sequences": len(train)}
        return Data(train, task_data(cfg, tokenizer, held_docs), n_train, len(held_docs), [source])
    if dc.mix:
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
    """The scoring batches: mask.calibration_blocks training blocks (sequences) for a one-shot scorer; for a VIB warm
    start mask.init_blocks when set, capped at the training data once (Fast-VTrans's few sequences are not cycled)."""
    bs = cfg.optim.batch_size
    blocks = cfg.mask.calibration_blocks
    if cfg.mask.method == "vib" and cfg.mask.init_blocks:
        blocks = min(cfg.mask.init_blocks, max(len(train), cfg.mask.calibration_blocks))
    return [b for _, b in zip(range(max(1, blocks // bs)), endless(train, bs, cfg.optim.seed))]


# ---------------------------------------------------------------------------------------------------------- masks


def training_rows(cfg: Config, tokenizer, data: Data, dense: Dense | None = None):
    """The job's whole training data: data.train, or for Fast-VTrans (which trains on a few percent of it) all of it
    (the token cache makes that a read after the first job)."""
    if cfg.mask.variant != "fast":
        return data.train
    return prepare_data(cfg, tokenizer, fast_floor=False, dense=dense).train


def warm_start_rows(cfg: Config, tokenizer, data: Data, dense: Dense | None = None):
    """What the VIB warm start scores on: the job's training data, or mask.init_source read whole (teacher:N sampled,
    or read from the sample cache) and cut into data.seq_len blocks (bench/results/quality_smollm2_init_source_0.8.md:
    scored on teacher samples alone, the documentation domains gained and the prose domains lost)."""
    if not cfg.mask.init_source:
        return data.train
    rows = D.lm_blocks(tokenizer, list(source_documents(cfg, cfg.mask.init_source, dense)), cfg.data.seq_len)
    if not len(rows):
        raise ValueError(f"mask.init_source={cfg.mask.init_source!r} gave no {cfg.data.seq_len}-token block to "
                         "score on")
    log.info("warm start scores on %s: %d blocks", cfg.mask.init_source, len(rows))
    return rows


def compensation_data(cfg: Config, tokenizer, data: Data, dense: Dense | None = None, rows=None):
    """The sequences the refit draws from, each distinct one once. mask.compensate_source, when set, is read (teacher:N
    sampled, or read from the sample cache) and cut into data.seq_len blocks; else the job's whole training data
    (`rows`, else training_rows). Fast-VTrans trains on a few percent of that, but the refit is a stage of its own with
    its own budget (mask.compensate_blocks), the same for every method; on its 34 training sequences (the default
    job's settings) the refit fits those and reads worse elsewhere. A mixture repeats the rows of a source smaller
    than its share (the default data holds each of its 128 teacher samples about 4 times): repeats add nothing to a
    least-squares fit but weight, so they are dropped. Called on one process (the refit runs on rank 0)."""
    if cfg.mask.compensate_source:
        rows = D.lm_blocks(tokenizer, list(source_documents(cfg, cfg.mask.compensate_source, dense)), cfg.data.seq_len)
    elif rows is None:
        rows = training_rows(cfg, tokenizer, data, dense)
    if isinstance(rows, torch.Tensor) and rows.ndim == 2 and len(rows):
        rows = torch.unique(rows, dim=0)  # sorted: the refit draws them in a seeded order (see compensate)
    return rows


def compensate(cfg: Config, pruned, dense_model, decision: Decision, train, scales=None, guard=None,
               unmasked=None) -> dict:
    """The compensation stage (mask.compensate): refit the pruned model's attention and FFN output projections, in
    place, so each block reproduces its masked block (every unit at its mask's scale: `scales`, from
    vtrans.masks.compensate.mask_scales; None: the unmasked block) on mask.compensate_blocks sequences of `train`
    (compensation_data).

    `guard` (causal LMs: the job's training token blocks) holds the text the refit is checked on: up to
    mask.compensate_guard_blocks of its rows that the refit did not draw. The pruned model's next-token loss on them
    is measured before and after the refit, and the refit is undone when it does not lower it: a refit fits its own
    sequences' activations, and where the masks have adapted to the cut (a deep cut) it can read worse on other
    text. 0 blocks (or no rows left) keeps the refit unchecked. `unmasked` (a context, MaskedModel.disabled) runs
    `dense_model` as the dense model for mask.compensate_correct's stream."""
    bs = cfg.optim.batch_size
    wanted = max(1, -(-cfg.mask.compensate_blocks // bs))
    distinct = max(1, len(train) // bs)  # one pass over the sequences: a repeated one changes nothing
    if wanted > distinct:
        log.warning("mask.compensate_blocks=%d, but the refit's data (%s) holds %d distinct sequences: the refit uses "
                    "those (a refit on few sequences fits them, not other text)", cfg.mask.compensate_blocks,
                    cfg.mask.compensate_source or "the training data", len(train))
    batches = [b for _, b in zip(range(min(wanted, distinct)), endless(train, bs, cfg.optim.seed + 1))]
    check = _guard_rows(cfg, guard, batches)
    before, saved = None, None
    if check is not None:
        before = evaluation.perplexity(pruned, check, batch_size=cfg.eval.batch_size)["nll"]  # not the eval stage
        fam = family_of(pruned)  # the projections the refit writes: attention's and the FFN's output
        written = (f"{fam.o}.weight", f"{fam.ffn_out}.weight")
        saved = {n: p.detach().clone() for n, p in pruned.named_parameters() if n.endswith(written)}
    with stop_checks(pruned):
        # the layers run one by one: a stop ends the refit between them
        info = refit_outputs(pruned, dense_model, decision, batches, damp=cfg.mask.compensate_damp,
                             check=ckpt.check_stop, unit_scales=scales, correct=cfg.mask.compensate_correct,
                             unmasked=unmasked)
    if check is None:
        return info
    after = evaluation.perplexity(pruned, check, batch_size=cfg.eval.batch_size)["nll"]
    kept = after < before
    if not kept:
        params = dict(pruned.named_parameters())
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
    log.info("compensation check on %d training sequences the refit did not draw: loss %.4f before, %.4f after the "
             "refit: %s", len(check), before, after, "kept" if kept else "undone (the materialised weights stay)")
    return {**info, "compensation_check_blocks": len(check), "compensation_check_nll_before": before,
            "compensation_check_nll_after": after, "compensation_kept": kept}


def _guard_rows(cfg: Config, guard, batches: list[dict]):
    """Up to mask.compensate_guard_blocks rows of `guard` that no refit batch holds (seeded), or None."""
    n = cfg.mask.compensate_guard_blocks
    if not n or guard is None or not isinstance(guard, torch.Tensor) or guard.ndim != 2:
        return None
    used = {tuple(r.tolist()) for b in batches for r in b["input_ids"]}
    rows = torch.unique(guard, dim=0)
    free = [i for i, r in enumerate(rows) if tuple(r.tolist()) not in used]
    if not free:
        log.warning("mask.compensate_guard_blocks=%d, but the refit drew every training sequence: the refit is kept "
                    "unchecked", n)
        return None
    order = torch.randperm(len(free), generator=torch.Generator().manual_seed(cfg.optim.seed + 2))[:n]
    return rows[torch.tensor([free[i] for i in order.tolist()])]


def budget_of(cfg: Config) -> Budget:
    return Budget(kind=cfg.budget.kind, target=cfg.budget.target, embeddings=cfg.budget.count_embeddings,
                  seq_len=cfg.budget.flops_seq_len)


def attach(cfg: Config, model) -> MaskedModel:
    """The attach stage: masks over mask.structures, initialised as mask.* says."""
    mask = cfg.mask
    return attach_masks(model, mask.structures, MaskInit(method=mask.method, mu=mask.mu_init, mu_std=mask.mu_std,
                                                         log_sigma2=mask.log_sigma2_init,
                                                         log_sigma2_std=mask.log_sigma2_std, k=mask.k,
                                                         gains=mask.gains))


def frozen_teacher(cfg: Config, model, sharded=None):
    """A separate frozen teacher when the weights train and something is distilled (VTrans, Fast-VTrans); None when
    the model with its masks off is the teacher (Faster-VTrans: frozen weights, no second copy) or nothing distils.
    Sharded runs load it sharded like the student (a copy would be whole)."""
    distills = cfg.distill.logit_weight > 0 or cfg.distill.layer_weight > 0
    if cfg.mask.method == "vib" and cfg.mask.variant != "faster" and distills:
        teacher = load(cfg.model, config=model.config, sharded=sharded)[0] if sharded else copy.deepcopy(model)
        return teacher.eval().requires_grad_(False)
    return None


def warm_start(cfg: Config, mm: MaskedModel, train, procs=None, lockstep: bool = False) -> float:
    """The warm-start stage: a one-shot ranking (mask.init_from) on the variant's own training data spreads the VIB
    masks' log_sigma2 (mask.init_spread); returns its seconds. A one-shot baseline's scoring is the same call. With
    several processes each scores its share of the calibration batches and the statistics are summed (equal shares
    under `lockstep`, a sharded model's forward being a collective)."""
    import time

    from .evaluation import rank_share

    t0 = time.perf_counter()
    method = cfg.mask.init_from if cfg.mask.method == "vib" else cfg.mask.method
    batches = calibration(train, cfg)
    everyone = procs
    if procs is not None and procs.distributed and len(batches) >= procs.world_size:
        if lockstep:
            batches = batches[: len(batches) - len(batches) % procs.world_size]
        batches = [b for b, _ in rank_share(batches, procs)]
    else:
        procs = None  # too few batches to share: every rank scores them all
    with stop_checks(mm.model):
        score_masks(mm, method, batches, seed=cfg.optim.seed, procs=procs, fisher_labels=cfg.mask.fisher_labels)
    if cfg.mask.method == "vib":
        spread_scores(mm, cfg.mask.init_spread)
        if everyone is not None:  # the summed scores agree; rank 0's masks make that exact
            everyone.broadcast_tensors(list(mm.mask_parameters()))
        model_labels = method == "taylor" and cfg.mask.fisher_labels == "model"
        labels = " (Fisher on the model's own predictions)" if model_labels else ""
        log.info("masks warm-started from %s scores%s (spread %g) in %.1f s", method, labels, cfg.mask.init_spread,
                 time.perf_counter() - t0)
    return time.perf_counter() - t0


def prepare_training(cfg: Config, model) -> None:
    """Activation checkpointing (optim.gradient_checkpointing) through transformers' own, non-reentrant, so the mask
    hooks run again in the recomputation with the same noise (the RNG state is restored) and frozen inputs work."""
    if cfg.optim.gradient_checkpointing:
        enable_activation_checkpointing(model)


def enable_activation_checkpointing(model) -> None:
    """transformers' activation checkpointing (named gradient checkpointing before transformers 5), non-reentrant."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


# ---------------------------------------------------------------------------------------------------------- decide


def iterative_decisions(mm: MaskedModel, budget: Budget, warmup_steps: int, final_ratio: float, every: int,
                        steps: int, uniform: bool = False, multiple_of: int = 1, ramp: str = "linear"):
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
        ratio = target_ratio(step, warmup_steps, final_ratio, ramp)
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


def materialise(cfg: Config, mm: MaskedModel, decision: Decision, fetch=None, build: bool = True,
                free: bool = False):
    """The materialise stage: the smaller model (stock classes with export_uniform=true), built one dense layer at a
    time through `fetch` (an engine's: under ZeRO-3 it gathers each tensor to rank 0 only); with `build=False` this
    process takes part in the fetching and gets None (only rank 0 builds, then saves, a sharded model). With `free`
    (the dense model is not used again) each ZeRO-3 partition is dropped once fetched: rank 0's peak is then its
    unread shard plus the pruned model so far, not the two whole."""
    if free and fetch is not None:
        fetch = functools.partial(fetch, free=True)
    pruned = materialize(mm, decision, fetch=fetch, build=build)
    if pruned is None:
        return None
    return to_stock(pruned) if cfg.export_uniform else pruned


def whole_copy(model, state: dict):
    """A whole (CPU) model of `model`'s class and config holding `state` (e.g. a sharded model's gathered weights),
    built with its parameters on the meta device and filled in place: no second copy is made."""
    from .masks.materialize import parameters_on_meta

    with parameters_on_meta():
        copy_ = type(model)(model.config)
    missing, unexpected = copy_.load_state_dict(state, strict=False, assign=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if [k for k in missing if not (tied and k.endswith("lm_head.weight"))] or unexpected:
        raise RuntimeError(f"whole copy: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        copy_.tie_weights()
    return copy_.eval()


def check_budget(model, budget: Budget, target: float) -> None:
    """The materialised model's counted parameters against the budget."""
    if budget.kind in ("params_ratio", "params"):
        counted = model_numel(model, embeddings=budget.embeddings)
        if counted > target:
            raise RuntimeError(f"pruned model has {counted:,} parameters, over the budget {target:,.0f}")


# ---------------------------------------------------------------------------------------------------------- evaluate


@contextlib.contextmanager
def stop_checks(model):
    """Every forward call of `model` first checks the stop flag (vtrans.checkpoint.check_stop): a job evaluating,
    scoring or probing obeys SIGTERM / SIGINT within one batch, without the metric code knowing."""
    def check(module, args):  # returns None: a pre-hook's return value would replace the inputs
        ckpt.check_stop()

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def progress(model, total: int | None, desc: str, enabled: bool, postfix: dict | None = None):
    """A tqdm bar (ETA included) advanced by every forward call of `model`, shown on rank 0 when enabled; each call
    checks the stop flag first (`stop_checks`)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=not (enabled and is_main_process()))
    if postfix:
        bar.set_postfix(postfix)

    def advance(module, args, out):  # returns None: a forward hook's return value would replace the output
        bar.update(1)

    handle = model.register_forward_hook(advance)
    try:
        with stop_checks(model):
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


def evaluate(model, tokenizer, cfg: Config, data, desc: str = "evaluate", lm_eval: bool = True, procs=None,
             lockstep: bool = False) -> dict:
    """The evaluate stage, the one evaluation entry point of every job: the task's own metrics on `data` (see
    task_data): perplexity (with its protocol), accuracy / F1 / Matthews, Pearson / Spearman, SQuAD exact match / F1;
    and, for causal LMs with eval.lm_eval_tasks, zero-shot accuracy through lm-evaluation-harness.

    With several processes (`procs`) the batches are split over the ranks and the results reduced: every rank gets
    the numbers one process computes. `lockstep`: the model is sharded (ZeRO-3), so every rank runs as many forwards;
    lm-eval then cannot run (it needs a whole model on one rank) and is skipped. lm-eval runs on rank 0 alone while
    the others wait (deepspeed.timeout_minutes)."""
    ec, dc = cfg.eval, cfg.data
    size = {"params": f"{model_numel(model) / 1e6:.2f}M"}
    share = dict(procs=procs, lockstep=lockstep)
    world = procs.world_size if procs is not None else 1
    if cfg.model.task == "causal_lm":
        window, stride = dc.eval_window or None, dc.eval_stride or None
        total = math.ceil(_ppl_batches(data, ec.batch_size, window, stride) / world)
        with progress(model, total, f"{desc} (perplexity)", cfg.progress, size):
            r = perplexity(model, data, batch_size=ec.batch_size, window=window, stride=stride, **share)
        protocol = "published" if ec.protocol == "published" else r["protocol"]  # its own windows, scored as blocks
        metrics = {"ppl": r["ppl"], "nll": r["nll"], "eval_tokens": r["tokens"], "eval_protocol": protocol,
                   "eval_window": r["window"] or dc.seq_len, "eval_stride": r["stride"] or dc.seq_len}
        if lm_eval:
            metrics.update(zero_shot(model, tokenizer, cfg, desc, procs, lockstep))
        return metrics
    total = math.ceil(math.ceil(len(data) / ec.batch_size) / world)
    if cfg.model.task == "sequence_classification":
        with progress(model, total, desc, cfg.progress, size):
            if cfg.model.num_labels == 1:
                return regression_metrics(model, data, batch_size=ec.batch_size, **share)
            return classification_metrics(model, data, batch_size=ec.batch_size, **share)
    with progress(model, total, f"{desc} (SQuAD)", cfg.progress, size):
        return qa_metrics(model, data, ec.batch_size, ec.qa_n_best, ec.qa_max_answer_len, **share)


def zero_shot(model, tokenizer, cfg: Config, desc: str, procs=None, lockstep: bool = False) -> dict:
    """eval.lm_eval_tasks through lm-evaluation-harness, on rank 0 (the others wait and receive its numbers); skipped
    with a warning for a sharded model."""
    ec = cfg.eval
    if not ec.lm_eval_tasks:
        return {}
    if lockstep:
        log.warning("%s: eval.lm_eval_tasks skipped: the model is sharded (ZeRO-3); run job=evaluate on it", desc)
        return {}
    metrics = None
    if procs is None or procs.is_main:
        with stop_checks(model):
            metrics = lm_eval_metrics(model, tokenizer, ec)
    return procs.broadcast(metrics) if procs is not None else metrics


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


def evaluate_dense(model, tokenizer, cfg: Config, data, desc: str = "dense", lm_eval: bool = True, procs=None,
                   lockstep: bool = False) -> dict:
    """evaluate() of the configured dense model (`model` must be it, masks off), its perplexity read from / written to
    the cache (vtrans.cache, in data.cache_dir) when eval.cache_dense is on: keyed by the model's files, the exact
    token blocks and the protocol, so every job on the same model and data evaluates the dense model once. With
    several processes they all evaluate unless every one of them finds the entry."""
    share = dict(procs=procs, lockstep=lockstep)
    if not (cfg.eval.cache_dense and cfg.model.task == "causal_lm"):
        return evaluate(model, tokenizer, cfg, data, desc, lm_eval, **share)
    record = {"model": model_identity(cfg, procs), "blocks": cache.digest(data),
              "window": cfg.data.eval_window, "stride": cfg.data.eval_stride, "version": PERPLEXITY_VERSION}
    path = cache.entry(cfg.data.cache_dir, "perplexity", record)
    metrics = cache.read(path, record)
    if procs is not None and procs.any(metrics is None)[0]:
        metrics = None
    if metrics is None:
        metrics = evaluate(model, tokenizer, cfg, data, desc, lm_eval=False, **share)
        if is_main_process():
            cache.write(path, record, metrics)
    else:
        log.info("%s: perplexity %.3f read from %s", desc, metrics["ppl"], path)
    if lm_eval:
        metrics = {**metrics, **zero_shot(model, tokenizer, cfg, desc, **share)}
    return metrics


def evaluate_domains(model, cfg: Config, domains: dict[str, torch.Tensor], suffix: str, dense: bool = False,
                     procs=None, lockstep: bool = False) -> dict:
    """ppl_<name>_<suffix> and nll_<name>_<suffix> of `model` on each cross-domain evaluation set (`dense`: the model
    is the configured dense one, see evaluate_dense); split over the ranks like evaluate."""
    metrics = {}
    for name, blocks in domains.items():
        run = evaluate_dense if dense else evaluate
        r = run(model, None, cfg, blocks, f"{suffix} {name}", lm_eval=False, procs=procs, lockstep=lockstep)
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


SAVE_OVERHEAD = 16 * 2 ** 20  # tokenizer, config and modeling files beside the weights (bytes, generous)


def model_bytes(model) -> int:
    """About how many bytes a saved copy of `model` takes (its weights in their dtype, also when ZeRO-3 shards them,
    plus SAVE_OVERHEAD)."""
    params = sum((getattr(p, "ds_numel", None) or p.numel()) * p.element_size() for p in model.parameters())
    return params + ckpt.tensor_bytes(b for _, b in model.named_buffers()) + SAVE_OVERHEAD


@contextlib.contextmanager
def writing_dir(target: Path, needed: int, what: str):
    """Yields a temporary directory beside `target` that replaces it once the block has written it whole: checks
    first that `needed` bytes are free (FreeSpaceError naming the path, bytes needed and free); a block that fails
    removes the temporary directory and leaves `target` as it was."""
    target = Path(target)
    ckpt.check_free_space(target.parent, needed, what)
    tmp, old = target.with_name(f".tmp-{target.name}"), target.with_name(f".old-{target.name}")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            target.replace(old)
        tmp.replace(target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            free = ckpt.size_text(ckpt.free_bytes(target))
            raise ckpt.FreeSpaceError(f"writing {what} to {target} failed ({e}); {free} free now; the partial copy "
                                      "was removed") from e
        raise
    shutil.rmtree(old, ignore_errors=True)


def _disk_full(e: BaseException) -> bool:
    """A full disk, as Python (ENOSPC) or torch's zip writer ("unexpected pos") reports it."""
    return getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or "No space left" in str(e)


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """tokenizer.save_pretrained without the truncation / padding state its last call left in a fast tokenizer's
    backend: the same tokenizer saves the same tokenizer.json whatever it tokenized before (a rerun that trains
    nothing writes the same model directory)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    truncation = padding = None
    if backend is not None:
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**{k: v for k, v in padding.items() if k != "pad_to_multiple_of" or v})


def save_model(model, tokenizer, model_dir: Path, decision: Decision | None = None) -> None:
    """The save stage (rank 0): a vtrans pruned model in its self-contained format (modeling files + auto_map), a
    stock model with save_pretrained; the tokenizer; the decision beside it (read by the probe job). Written whole
    or not at all (`writing_dir`), after checking the disk has room."""
    from .models import is_pruned

    model_dir = Path(model_dir)
    with writing_dir(model_dir, model_bytes(model), "the model") as tmp:
        if is_pruned(model.config):
            save_pruned(model, tmp, max_shard_size=SHARD_SIZE)
        else:
            model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        save_tokenizer(tokenizer, tmp)
        if decision is not None:
            write_json(tmp / DECISION_FILE, decision.record())


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
