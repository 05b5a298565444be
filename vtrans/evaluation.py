"""Evaluation of (pruned) transformers: exact token-level perplexity of causal LMs, task metrics, and zero-shot
tasks through lm-evaluation-harness.

Metric formulas (accuracy, F1, Matthews correlation, Pearson, Spearman; SQuAD v1.1 exact match and F1 with the
official answer normalisation and the usual n-best span post-processing) are implemented here with torch.
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import math
import re
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vtrans.data import ClassificationData, QAExample, QAFeatures, batches

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- perplexity


def perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    window: int | None = None,
    stride: int | None = None,
    procs=None,
    lockstep: bool = False,
) -> dict:
    """Token-level perplexity of a causal LM on held-out token blocks ([N, T] LongTensor).

    Without `window` ("blocks" protocol) every block is scored on its own: tokens 1..T-1 of each block,
    N * (T - 1) tokens. With `window` ("sliding_window" protocol) the blocks are concatenated into one
    stream of L tokens; windows of up to `window` tokens start every `stride` tokens (default window // 2,
    1 <= stride < window) and each scores only tokens not yet scored, so tokens 1..L-1 are each scored
    exactly once, with at least window - stride and at most window - 1 tokens of context.

    With `procs` (several processes, see `rank_share`) each rank scores its share of the batches and the sums are
    reduced: the same numbers as one process.

    Returns dict(ppl, nll (mean per token, nats), tokens, window, stride, protocol).
    """
    blocks = _check_blocks(blocks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if window is None:
        if stride is not None:
            raise ValueError("stride needs a window; omit both to score each block independently")
        _check_context(model, blocks.shape[1])
        spans = [(blocks[i], 1) for i in range(blocks.shape[0])]
        protocol = "blocks"
    else:
        stride = window // 2 if stride is None else stride
        if window < 2 or not 1 <= stride < window:
            raise ValueError(
                f"need window >= 2 and 1 <= stride < window, got window={window}, stride={stride}"
            )
        _check_context(model, window)
        spans = list(_sliding_windows(blocks.reshape(-1), window, stride))
        protocol = "sliding_window"
    nll_sum, tokens = _score_spans(model, spans, batch_size, procs, lockstep)
    nll = nll_sum / tokens
    return {
        "ppl": math.exp(nll) if nll < 700 else math.inf,
        "nll": nll,
        "tokens": tokens,
        "window": window,
        "stride": stride,
        "protocol": protocol,
    }


def _check_blocks(blocks: torch.Tensor) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.long:
        kind = getattr(blocks, "dtype", type(blocks).__name__)
        raise ValueError(f"blocks must be a LongTensor of token ids, got {kind}")
    if blocks.dim() == 1:
        blocks = blocks.unsqueeze(0)
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must have shape [N >= 1, T >= 2], got {tuple(blocks.shape)}")
    return blocks


def _check_context(model: nn.Module, length: int) -> None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and length > limit:
        raise ValueError(f"sequences of {length} tokens exceed the model's context of {limit} positions")


def _sliding_windows(stream: torch.Tensor, window: int, stride: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(window tokens, index within the window of the first token it scores)."""
    length = stream.numel()
    scored_to = 1  # token 0 has no context and is never scored
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        yield stream[begin:end], scored_to - begin
        scored_to = end
        if end == length:
            return


def _score_spans(
    model: nn.Module, spans: list[tuple[torch.Tensor, int]], batch_size: int, procs=None, lockstep: bool = False
) -> tuple[float, int]:
    """Sum of -log p(token | preceding tokens in its span) over each span's tokens from its first index (this rank's
    share of the batches, reduced over the ranks)."""
    device = _device(model)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # nll sum, tokens
    with _eval_mode(model), torch.no_grad():
        for group, counted in rank_share(list(_same_length_batches(spans, batch_size)), procs, lockstep):
            ids = torch.stack([s for s, _ in group]).to(device)
            logits = _logits(model, input_ids=ids)
            if not counted:
                continue
            for row, (_, first) in enumerate(group):
                targets = ids[row, first:]
                predicted = logits[row, first - 1 : -1].float()
                total[0] += F.cross_entropy(predicted, targets, reduction="sum").double()
                total[1] += targets.numel()
    if procs is not None:
        total = procs.sum(total)
    return total[0].item(), int(total[1].item())


def rank_share(items: list, procs=None, lockstep: bool = False) -> list[tuple[object, bool]]:
    """This rank's contiguous share of `items` as (item, counted) pairs. `procs` (vtrans.engine.Processes) says the
    rank and world size; None: one process, everything. With `lockstep` every rank gets as many items as the largest
    share, the missing ones as uncounted repeats (a model sharded by ZeRO-3 runs every forward on all ranks)."""
    if procs is None or procs.world_size == 1:
        return [(item, True) for item in items]
    share = [(items[i], True) for i in procs.shard(len(items))]
    if lockstep and items:
        longest = -(-len(items) // procs.world_size)
        share += [(items[0], False)] * (longest - len(share))
    return share


def _gather_rows(parts: list[torch.Tensor], procs) -> torch.Tensor:
    """This rank's rows concatenated, then every rank's, in rank order (contiguous shares keep the order)."""
    local = torch.cat(parts) if parts else None
    if procs is None or procs.world_size == 1:
        return local
    return torch.cat([t for t in procs.gather(local) if t is not None])


def _same_length_batches(spans: list[tuple[torch.Tensor, int]], batch_size: int) -> Iterator[list]:
    group: list = []
    for span in spans:
        if group and (len(group) == batch_size or span[0].numel() != group[0][0].numel()):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


class _eval_mode:
    """Put a model in eval mode and restore its previous training flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _logits(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


# ----------------------------------------------------------------------------------------- task metrics


def predict(model: nn.Module, data: ClassificationData, batch_size: int = 32, procs=None,
            lockstep: bool = False) -> torch.Tensor:
    """The model's logits [N, num_labels] on `data`, in order (eval mode, no grad, CPU float32); with `procs` each
    rank predicts its share of the batches and every rank gets all the logits."""
    device = _device(model)
    out = []
    with _eval_mode(model), torch.no_grad():
        for batch, counted in rank_share(list(batches(data, batch_size, shuffle=False)), procs, lockstep):
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = _logits(model, **inputs).float().cpu()
            if counted:
                out.append(logits)
    return _gather_rows(out, procs)


def classification_metrics(model: nn.Module, data: ClassificationData, batch_size: int = 32, procs=None,
                           lockstep: bool = False) -> dict:
    """dict(accuracy, f1, f1_average, matthews_corrcoef, n) of argmax predictions.

    F1 is binary (positive class 1) for two classes, macro-averaged over the classes present otherwise.
    """
    logits = predict(model, data, batch_size, procs, lockstep)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"classification needs logits [N, C >= 2], got {tuple(logits.shape)}; use regression_metrics"
        )
    preds, labels = logits.argmax(-1), data.labels.long()
    average = "binary" if logits.shape[1] == 2 else "macro"
    return {
        "accuracy": accuracy(preds, labels),
        "f1": f1_score(preds, labels, average),
        "f1_average": average,
        "matthews_corrcoef": matthews_corrcoef(preds, labels),
        "n": labels.numel(),
    }


def regression_metrics(model: nn.Module, data: ClassificationData, batch_size: int = 32, procs=None,
                       lockstep: bool = False) -> dict:
    """dict(pearson, spearman, n) of a single-output regression head (e.g. STS-B)."""
    logits = predict(model, data, batch_size, procs, lockstep)
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.dim() != 1:
        raise ValueError(f"regression needs one output per example, got logits {tuple(logits.shape)}")
    labels = data.labels.float()
    return {"pearson": pearson(logits, labels), "spearman": spearman(logits, labels), "n": labels.numel()}


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 1 or a.numel() == 0:
        raise ValueError(
            f"need two non-empty 1-D tensors of equal length, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels."""
    _check_pair(preds, labels)
    return (preds == labels).double().mean().item()


def f1_score(preds: torch.Tensor, labels: torch.Tensor, average: str = "binary") -> float:
    """F1 of the positive class 1 ("binary") or the mean F1 over classes in labels or preds ("macro").

    A class with no true and no predicted positives would divide by zero; its F1 counts as 0.
    """
    _check_pair(preds, labels)
    if average == "binary":
        return _class_f1(preds, labels, 1)
    if average == "macro":
        classes = torch.unique(torch.cat([preds, labels])).tolist()
        return sum(_class_f1(preds, labels, c) for c in classes) / len(classes)
    raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")


def _class_f1(preds: torch.Tensor, labels: torch.Tensor, cls: int) -> float:
    tp = ((preds == cls) & (labels == cls)).sum().item()
    fp = ((preds == cls) & (labels != cls)).sum().item()
    fn = ((preds != cls) & (labels == cls)).sum().item()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation, multi-class R_K form (the binary formula for two classes); 0 if undefined."""
    _check_pair(preds, labels)
    classes, inverse = torch.unique(torch.cat([labels, preds]), return_inverse=True)
    k, n = classes.numel(), labels.numel()
    conf = torch.zeros(k, k, dtype=torch.float64)
    conf.index_put_((inverse[:n], inverse[n:]), torch.ones(n, dtype=torch.float64), accumulate=True)
    t, p, c = conf.sum(1), conf.sum(0), conf.trace()
    cov_tp = c * n - (t * p).sum()
    denom = torch.sqrt((n * n - (p * p).sum()) * (n * n - (t * t).sum()))
    return (cov_tp / denom).item() if denom > 0 else 0.0


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; NaN when either input is constant."""
    _check_pair(x, y)
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = torch.sqrt((x * x).sum() * (y * y).sum())
    return (x * y).sum().item() / denom.item() if denom > 0 else math.nan


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of ranks, ties given their average rank."""
    _check_pair(x, y)
    return pearson(_average_ranks(x), _average_ranks(y))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    values = x.double()
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of the first element of each distinct value
    mean_rank = first.double() + (counts.double() + 1) / 2  # 1-based average rank
    return mean_rank[inverse]


# ----------------------------------------------------------------------------------------- question answering

_PUNCTUATION = frozenset(string.punctuation)
_QA_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official answer normalisation: lower case, punctuation removed, the articles a / an / the
    removed, whitespace collapsed to single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, truth: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_answer_score(prediction: str, truth: str) -> float:
    """Token F1 between the normalised answers (tokens counted with multiplicity); 0.0 without common tokens."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], examples: Sequence[QAExample]) -> dict:
    """dict(exact_match, f1, n): the means over the questions of each score's max over the gold answers, on the
    0-100 scale of the official SQuAD v1.1 evaluation script (and of published tables). A question without a
    prediction scores 0."""
    if not examples:
        raise ValueError("no questions to score")
    em = f1 = 0.0
    for ex in examples:
        pred = predictions.get(ex.id, "")
        golds = ex.answers or [""]
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_answer_score(pred, g) for g in golds)
    return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f1 / len(examples), "n": len(examples)}


def squad_predictions(
    start_logits: torch.Tensor, end_logits: torch.Tensor, feats: QAFeatures, n_best: int = 20,
    max_answer_len: int = 30,
) -> dict[str, str]:
    """The answer text per question id: over all windows of a question, the span with the highest start + end
    logit among the `n_best` start and `n_best` end candidates of each window that lies inside the context, ends
    at or after its start and is at most `max_answer_len` tokens long; cut from the context through the offsets.
    A question without any valid span gets ""."""
    if start_logits.shape != end_logits.shape or start_logits.shape[0] != len(feats):
        raise ValueError(f"need start and end logits [{len(feats)}, T], got {tuple(start_logits.shape)} and "
                         f"{tuple(end_logits.shape)}")
    best: dict[int, tuple[float, int, int]] = {}  # example index -> (score, first char, end char)
    context = feats.offsets[..., 0] >= 0
    for f in range(len(feats)):
        if not bool(context[f].any()):
            continue
        s_log = start_logits[f].float().masked_fill(~context[f], -math.inf)
        e_log = end_logits[f].float().masked_fill(~context[f], -math.inf)
        k = min(n_best, int(context[f].sum()))
        s_val, s_idx = s_log.topk(k)
        e_val, e_idx = e_log.topk(k)
        length = e_idx[None, :] - s_idx[:, None] + 1
        score = (s_val[:, None] + e_val[None, :]).masked_fill((length < 1) | (length > max_answer_len), -math.inf)
        top = int(score.argmax())
        value = float(score.flatten()[top])
        if value == -math.inf:
            continue
        s, e = int(s_idx[top // k]), int(e_idx[top % k])
        ex = feats.example_index[f]
        if ex not in best or value > best[ex][0]:
            best[ex] = (value, int(feats.offsets[f, s, 0]), int(feats.offsets[f, e, 1]))
    out = {}
    for i, ex in enumerate(feats.examples):
        if i in best:
            _, a, b = best[i]
            out[ex.id] = ex.context[a:b]
        else:
            out[ex.id] = ""
    return out


def qa_logits(model: nn.Module, feats: QAFeatures, batch_size: int = 32, procs=None,
              lockstep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (start, end) logits [N, T] on every window, in order (eval mode, no grad, CPU float32); with
    `procs` each rank scores its share of the batches and every rank gets all the logits."""
    device = _device(model)
    starts, ends = [], []
    with _eval_mode(model), torch.no_grad():
        for batch, counted in rank_share(list(batches(feats, batch_size, shuffle=False)), procs, lockstep):
            out = model(**{k: v.to(device) for k, v in batch.items() if k in _QA_INPUTS})
            if counted:
                starts.append(out.start_logits.float().cpu())
                ends.append(out.end_logits.float().cpu())
    return _gather_rows(starts, procs), _gather_rows(ends, procs)


def qa_metrics(model: nn.Module, feats: QAFeatures, batch_size: int = 32, n_best: int = 20,
               max_answer_len: int = 30, procs=None, lockstep: bool = False) -> dict:
    """dict(exact_match, f1, n) of a question-answering model's predicted spans (see `squad_predictions`)."""
    start, end = qa_logits(model, feats, batch_size, procs, lockstep)
    return squad_scores(squad_predictions(start, end, feats, n_best, max_answer_len), feats.examples)


# ----------------------------------------------------------------------------------------- zero-shot tasks (lm-eval)


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval(ec) -> None:
    """Fail before any model is loaded when lm-eval tasks (`ec`: the eval config) are asked for but cannot run."""
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


# lm-eval metrics kept in a job's metrics (lm_eval_<task>_<metric>): accuracies, and the word / byte perplexities and
# bits per byte of rolling-loglikelihood tasks such as `wikitext` (whole-document scores, not token perplexity)
_LM_EVAL_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity", "byte_perplexity",
                    "bits_per_byte")


def lm_eval_metrics(model: nn.Module, tokenizer, ec) -> dict:
    """Zero-shot (or few-shot) accuracy on eval.lm_eval_tasks through lm-evaluation-harness (imported lazily): its
    own tasks by name (their data comes from the hub), or tasks defined by YAML files in eval.lm_eval_include_path
    (e.g. `dataset_path: json` with local `data_files`, which runs offline). `ec`: the eval config."""
    if not ec.lm_eval_tasks:
        return {}
    require_lm_eval(ec)
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
            if name in _LM_EVAL_METRICS and isinstance(value, (int, float)):
                out[f"lm_eval_{task}_{name}"] = float(value)
        if isinstance(r.get("acc,none"), (int, float)):
            accs.append(float(r["acc,none"]))
    if accs:
        out["lm_eval_mean"] = sum(accs) / len(accs)
    return out
