"""The probe job (the paper's attention analysis): for every head of the dense model, the share of its attention
on special tokens ([CLS] / [SEP] / BOS / EOS), on the current token and on the rest, averaged over the query
positions of evaluation text; heads split into those the pruned model keeps and those it drops. Writes
probe.csv / probe.json (per head, and the kept-vs-pruned means) and probe.png.

Kept heads come from `probe.decision` or <model_dir>/vtrans_decision.json ({"kept_heads": [[query-head indices]
per dense layer]}: `Decision.record()`), else are read off the pruned model's weights (`model_dir`):
materialisation copies each kept head's query rows unscaled, so matching them against the dense model's rows
recovers which heads (and which dense layers) survived."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import pipeline as P
from ..checkpoint import check_stop
from ..config import Config
from ..strict_json import write as write_json
from ..decision import DECISION_FILE
from ..log import RunLogger, write_csv
from ..models import base_model, family_of, get_module, shape_of

log = logging.getLogger("vtrans")
SHARES = ("special", "current", "rest")


# ---------------------------------------------------------------------------------------------- kept heads


def _weight(module, conv1d: bool) -> torch.Tensor:
    """A projection's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    w = module.weight.detach().float()
    return w.t() if conv1d else w


def _query_rows(layer, fam, n_heads: int, head_dim: int) -> torch.Tensor | None:
    """The query projection's rows [heads * head_dim, hidden] of a layer; None when it has no attention."""
    try:
        w = _weight(get_module(layer, fam.qkv[0]), fam.conv1d)
    except AttributeError:  # a removed post-norm attention block has no projections at all
        return None
    if len(fam.qkv) == 1:  # fused q|k|v (gpt2): the query part comes first
        w = w[: n_heads * head_dim]
    return w if w.shape[0] else None


def _ffn_rows(layer, fam) -> torch.Tensor | None:
    try:
        w = _weight(get_module(layer, fam.ffn_in[0]), fam.conv1d)
    except AttributeError:
        return None
    return w if w.shape[0] else None


def _match_rows(pruned: torch.Tensor, dense: torch.Tensor, tol: float = 1e-3) -> torch.Tensor | None:
    """For each pruned row the index of the identical dense row; None unless every row has one."""
    if pruned.shape[1] != dense.shape[1] or pruned.shape[0] > dense.shape[0]:
        return None
    idx = torch.cdist(pruned, dense).argmin(1)  # fast but inexact distances: only to find the candidates
    err = (pruned - dense[idx]).abs().amax(1)  # exact check of each candidate
    if bool((err <= tol * (pruned.abs().amax(1) + 1e-12)).all()):
        return idx
    return None


def _kept_hidden(dense_base, pruned_base, fam, hidden_dense: int, hidden_pruned: int) -> torch.Tensor:
    """Dense indices of the pruned model's hidden channels, matched on the embedding columns (which are only
    selected, and for pre-norm models scaled per channel, by materialisation)."""
    if hidden_pruned == hidden_dense:
        return torch.arange(hidden_dense)
    d = get_module(dense_base, fam.embeddings[0]).weight.detach().float()[:4096]
    p = get_module(pruned_base, fam.embeddings[0]).weight.detach().float()[:4096]
    d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)
    p = p / p.norm(dim=0, keepdim=True).clamp_min(1e-12)
    sim = (p.t() @ d).abs()  # [hidden_pruned, hidden_dense]
    best, idx = sim.max(1)
    if not bool((best > 0.999).all()) or idx.unique().numel() != idx.numel():
        raise ValueError("the pruned model's embedding columns do not match the dense model's: is model_dir "
                         "pruned from the configured model?")
    return idx


def kept_heads_from_weights(dense, pruned) -> list[list[int]]:
    """Query heads of each dense layer that the pruned model keeps (a removed layer keeps none)."""
    ds, ps = shape_of(dense), shape_of(pruned)
    if ds.family != ps.family:
        raise ValueError(f"model_dir holds a {ps.family} model but the configured model is {ds.family}")
    fam = family_of(dense)
    d_base, p_base = base_model(dense, fam), base_model(pruned, fam)
    hk = _kept_hidden(d_base, p_base, fam, ds.hidden, ps.hidden)
    d_layers, p_layers = get_module(d_base, fam.layers), get_module(p_base, fam.layers)
    dh = ds.head_dim
    kept: list[list[int]] = [[] for _ in ds.layers]
    next_dense = 0
    for j, (p_layer, p_shape) in enumerate(zip(p_layers, ps.layers)):
        pq = _query_rows(p_layer, fam, p_shape.heads, dh)
        pf = _ffn_rows(p_layer, fam) if pq is None else None
        for i in range(next_dense, len(ds.layers)):
            if pq is not None:
                dq = _query_rows(d_layers[i], fam, ds.layers[i].heads, dh)
                idx = _match_rows(pq, dq[:, hk])
                if idx is not None:
                    kept[i] = sorted({int(r) // dh for r in idx})
                    break
            elif pf is not None:
                df = _ffn_rows(d_layers[i], fam)
                if _match_rows(pf, df[:, hk]) is not None:
                    break  # an FFN-only layer: no heads kept
        else:
            raise ValueError(f"pruned layer {j} matches no dense layer at or after {next_dense}: is model_dir "
                             "pruned from the configured model?")
        next_dense = i + 1
    return kept


def load_decision(path: str, n_layers: int, n_heads: list[int]) -> list[list[int]]:
    data = json.loads(Path(path).read_text())
    heads = data.get("kept_heads") if isinstance(data, dict) else None
    if not isinstance(heads, list) or len(heads) != n_layers:
        raise ValueError(f"probe.decision={path!r}: expected {{\"kept_heads\": [[head indices] x {n_layers} layers]}}")
    for i, (layer, n) in enumerate(zip(heads, n_heads)):
        if not isinstance(layer, list) or any(not isinstance(h, int) or not 0 <= h < n for h in layer):
            raise ValueError(f"probe.decision={path!r}: layer {i} must list head indices in [0, {n}), got {layer!r}")
    return [sorted(set(layer)) for layer in heads]


# ---------------------------------------------------------------------------------------------- attention shares


def attention_shares(model, tokenizer, texts: list[str], seq_len: int, batch_size: int,
                     show_progress: bool = True, pairs: list[str] | None = None) -> torch.Tensor:
    """[layers, heads, 3]: the mean share of attention on special tokens, on the current token (when it is not
    special) and on the rest, over every real (non-padding) query position of `texts` (with their `pairs`:
    sentence-pair tasks, or a QA question's passage), tokenised with the tokenizer's special tokens."""
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids) - {tokenizer.pad_token_id}))
    device = next(model.parameters()).device
    totals, count = None, 0
    starts = range(0, len(texts), batch_size)
    with P.progress(model, len(starts), "probe", show_progress), torch.no_grad():
        for i in starts:
            second = pairs[i: i + batch_size] if pairs is not None else None
            enc = tokenizer(texts[i: i + batch_size], second, truncation=True, max_length=seq_len, padding=True,
                            return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            out = model(**enc, output_attentions=True)
            if not out.attentions or out.attentions[0].numel() == 0:
                raise RuntimeError("the model returned no attention weights (it must run eager attention)")
            valid = enc["attention_mask"].bool()  # [B, T]
            special = torch.isin(enc["input_ids"], special_ids.to(device)) & valid  # keys that are special
            eye = torch.eye(valid.shape[1], dtype=torch.bool, device=device)
            current = eye & ~special[:, None, :]  # [B, Tq, Tk]: the query's own position, when not special
            per_layer = []
            for att in out.attentions:  # [B, H, Tq, Tk]
                a = att.float()
                s = (a * special[:, None, None, :]).sum(-1)
                c = (a * current[:, None]).sum(-1)
                r = a.sum(-1) - s - c
                q = valid[:, None, :].float()  # real query positions
                per_layer.append(torch.stack([(x * q).sum((0, 2)) for x in (s, c, r)], -1))  # [H, 3]
            stacked = torch.stack(per_layer)
            totals = stacked if totals is None else totals + stacked
            count += int(valid.sum())
    return totals / max(count, 1)


def head_rows(shares: torch.Tensor, kept: list[list[int]]) -> list[dict]:
    rows = []
    for layer in range(shares.shape[0]):
        for head in range(shares.shape[1]):
            s = shares[layer, head].tolist()
            rows.append({"layer": layer, "head": head, "kept": head in kept[layer],
                         **{name: round(v, 6) for name, v in zip(SHARES, s)}})
    return rows


def compare(rows: list[dict]) -> dict:
    """Mean shares over kept and over pruned heads, and their differences."""
    out = {"heads": len(rows), "heads_kept": sum(r["kept"] for r in rows)}
    out["heads_pruned"] = out["heads"] - out["heads_kept"]
    for group, flag in (("kept", True), ("pruned", False)):
        sel = [r for r in rows if r["kept"] == flag]
        for name in SHARES:
            out[f"{group}_{name}_mean"] = sum(r[name] for r in sel) / len(sel) if sel else None
    for name in SHARES:
        kept, pruned = out[f"kept_{name}_mean"], out[f"pruned_{name}_mean"]
        out[f"{name}_gap_pruned_minus_kept"] = None if kept is None or pruned is None else pruned - kept
    return out


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    width = 0.38
    for k, (group, color) in enumerate((("kept", "tab:blue"), ("pruned", "tab:red"))):
        vals = [summary[f"{group}_{n}_mean"] for n in SHARES]
        n = summary[f"heads_{group}"]
        ax1.bar([i + (k - 0.5) * width for i in range(3)], [v or 0.0 for v in vals], width,
                label=f"{group} heads ({n})", color=color)
    ax1.set_xticks(range(3), ["special tokens", "current token", "other tokens"])
    ax1.set_ylabel("mean share of attention")
    ax1.set_title("where heads attend")
    ax1.legend()
    for group, flag, color in (("kept", True, "tab:blue"), ("pruned", False, "tab:red")):
        sel = [r for r in rows if r["kept"] == flag]
        ax2.scatter([r["special"] for r in sel], [r["current"] for r in sel], s=14, alpha=0.7, color=color,
                    label=group)
    ax2.set_xlabel("share on special tokens")
    ax2.set_ylabel("share on the current token")
    ax2.set_title("per head")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------- the job


def run(cfg: Config, out: Path) -> dict:
    t0 = time.perf_counter()
    procs = P.setup(cfg)
    dense, tokenizer = P.load(cfg.model, eager=True, device=procs.device)
    ds = shape_of(dense)
    saved = Path(cfg.model_dir) / DECISION_FILE if cfg.model_dir else None
    if cfg.probe.decision or (saved is not None and saved.is_file()):
        source = cfg.probe.decision or str(saved)
        kept = load_decision(source, len(ds.layers), [l.heads for l in ds.layers])
    else:
        pruned, _ = P.load(P.dir_model_config(cfg, cfg.model_dir), device=procs.device)
        kept = kept_heads_from_weights(dense, pruned)
        source = cfg.model_dir
        del pruned
    _, held = P.documents(cfg, dense=lambda: (dense, tokenizer))
    held = held[: cfg.probe.max_examples]
    check_stop()
    if cfg.model.task == "question_answering":
        texts, pairs = [e.question for e in held], [e.context for e in held]
    else:
        texts, pairs = [d.text for d in held], [d.text_pair for d in held]
        pairs = None if any(p is None for p in pairs) else pairs
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="probe")
    shares = attention_shares(dense, tokenizer, texts, cfg.data.seq_len, cfg.probe.batch_size, cfg.progress,
                              pairs)
    rows = head_rows(shares, kept)
    summary = compare(rows)
    metrics = {"kept_from": source, "probe_examples": len(texts), **summary}
    if procs.is_main:
        write_csv(rows, out / "probe.csv")
        write_json(out / "probe.json", {"summary": summary, "kept_heads": kept, "heads": rows}, indent=2)
        plot(rows, summary, out / "probe.png")
        metrics.update(probe_csv=str(out / "probe.csv"), probe_json=str(out / "probe.json"),
                       probe_png=str(out / "probe.png"))
        logger.table("probe/heads", rows)
        logger.image("probe/plot", out / "probe.png")
    metrics["wall_time_s"] = time.perf_counter() - t0
    P.report(cfg, out, metrics, logger, {"probe": out / "probe.json"})
    log.info("probe: mean attention on special tokens: kept heads %s, pruned heads %s",
             summary["kept_special_mean"], summary["pruned_special_mean"])
    return metrics
