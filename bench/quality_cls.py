"""Classifier quality at equal budgets, cross-validated: the real MiniLM fine-tuned on gensim's Pang & Lee polarity
sentences, then pruned by every one-shot baseline and VTrans variant, each scored on the held-out fold.

For each of K folds (document-level, every sentence held out exactly once): fine-tune the dense MiniLM and a fresh
classification head on the other folds (job=finetune), prune that fine-tuned model at each budget with each method,
distilling from it (job=prune), and run distilled recovery fine-tuning after VTrans (job=finetune). Writes per-fold
and aggregated CSVs and a Markdown table (mean +- std held-out accuracy over the folds) into bench/results/. Usage:

    python bench/quality_cls.py                                  # 5 folds, 20 % and 50 %, every method
    python bench/quality_cls.py --folds 2 --budgets 0.8 --methods magnitude,faster --steps 40
    python bench/quality_cls.py --methods fast --update     # redo one method, keep the other rows

On a CPU shared with other work, OMP_NUM_THREADS=1 is much faster than oversubscribed threads (~28 min in all here).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import BASELINES, VARIANTS, compose  # noqa: E402
from vtrans.jobs import run  # noqa: E402
from vtrans.models.load import resolve_model_source  # noqa: E402

RECOVERED = "vtrans+recovery"  # vtrans, then distilled recovery fine-tuning of the pruned model


def base_overrides(fold: int, out: Path, args) -> list[str]:
    """conf/model/minilm.yaml and conf/data/polarity.yaml with fold `fold` of `args.folds` held out; sizes and FLOPs
    at the training length."""
    # a rerun into the same --out trains afresh: the bench owns these job directories, and the jobs themselves refuse
    # to start over a checkpoint they did not write (left by an interrupted bench)
    shutil.rmtree(out, ignore_errors=True)
    return ["model=minilm", "data=polarity", f"data.seq_len={args.seq_len}", f"data.folds={args.folds}",
            f"data.fold={fold}", f"budget.flops_seq_len={args.seq_len}", f"optim.seed={args.seed}",
            "checkpoint.resume=false", "progress=false", "logger=none", f"output_dir={out}"]


def fine_tuned(dense_dir: str) -> list[str]:
    """The model overrides naming a fine-tuned MiniLM directory."""
    return [f"model.name_or_path={dense_dir}", "model.package=''", "model.subdir=''"]


def dense_finetune(fold: int, out: Path, args) -> dict:
    """The dense MiniLM + a fresh head, fine-tuned on the training folds with the task loss only."""
    minilm = compose(["model=minilm", "data=polarity"]).model
    return run(compose(base_overrides(fold, out, args) + [
        "job=finetune", f"model_dir={resolve_model_source(minilm)[0]}", "distill.logit_weight=0",
        f"finetune.steps={args.dense_steps}", f"finetune.lr={args.dense_lr}", f"finetune.batch_size={args.dense_batch}"]))


def prune(method: str, keep: float, dense_dir: str, fold: int, out: Path, args) -> dict:
    """Prune the fine-tuned model (also the teacher) to `keep` of its parameters, embeddings counted."""
    mask = ([f"mask.method={method}"] if method in BASELINES else
            [f"mask={method}", f"optim.mask_lr={args.mask_lr}", f"mask.init_from='{args.init_from}'", *args.vib])
    return run(compose(base_overrides(fold, out, args) + fine_tuned(dense_dir) + [
        "budget.kind=params_ratio", f"budget.target={keep}", f"optim.steps={args.steps}", *mask]))


def recover(pruned_dir: str, dense_dir: str, fold: int, out: Path, args) -> dict:
    """Recovery fine-tuning of a pruned model: task loss + logit distillation from the fine-tuned dense model."""
    return run(compose(base_overrides(fold, out, args) + fine_tuned(dense_dir) + [
        "job=finetune", f"model_dir={pruned_dir}", f"finetune.steps={args.recovery_steps}",
        f"finetune.lr={args.recovery_lr}", f"finetune.batch_size={args.dense_batch}"]))


def run_fold(fold: int, keeps: list[float], methods: list[str], args) -> list[dict]:
    root = Path(args.out) / f"fold{fold}"
    t = time.perf_counter()
    d = dense_finetune(fold, root / "dense", args)
    dense_dir = d["model_dir"]
    rows = [{"fold": fold, "budget_kept": 1.0, "method": "dense", "accuracy": d["accuracy_after"],
             "accuracy_dense": d["accuracy_after"], "accuracy_pretrained_head": d["accuracy_before"],
             "params": d["params"], "param_reduction": 0.0, "flops_ratio": 1.0, "compression_s": 0.0,
             "finetune_s": d["train_time_s"], "job_wall_s": time.perf_counter() - t}]
    print(json.dumps(rows[-1]), flush=True)
    runs = [m for m in methods if m != RECOVERED]
    if RECOVERED in methods and "vtrans" not in runs:
        runs.append("vtrans")
    for keep in keeps:
        for method in runs:
            t = time.perf_counter()
            m = prune(method, keep, dense_dir, fold, root / f"{method}-{keep}", args)
            row = {"fold": fold, "budget_kept": keep, "method": method, "accuracy": m["accuracy_pruned"],
                   "accuracy_dense": m["accuracy_dense"], "params": m["params_pruned"],
                   "param_reduction": m["param_reduction"], "flops_ratio": m["flops_pruned"] / m["flops_dense"],
                   "compression_s": m["train_time_s"], "job_wall_s": time.perf_counter() - t}
            if method == "vtrans" and RECOVERED in methods:
                t = time.perf_counter()
                r = recover(m["model_dir"], dense_dir, fold, root / f"{RECOVERED}-{keep}", args)
                rows.append({**row, "method": RECOVERED, "accuracy": r["accuracy_after"],
                             "compression_s": m["train_time_s"] + r["train_time_s"],
                             "job_wall_s": row["job_wall_s"] + time.perf_counter() - t})
                print(json.dumps(rows[-1]), flush=True)
                if not args.keep_models:
                    discard(r["model_dir"])
            if method in methods:
                rows.append(row)
                print(json.dumps(row), flush=True)
            if not args.keep_models:
                discard(m["model_dir"])
    if not args.keep_models:
        discard(dense_dir)
    return rows


def discard(model_dir: str) -> None:
    """Remove a job's saved model (50-90 MB) and final training checkpoint (~260 MB); its metrics.json stays."""
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.rmtree(Path(model_dir).parent / "checkpoints", ignore_errors=True)


def aggregate(rows: list[dict], keeps: list[float], methods: list[str]) -> list[dict]:
    def mean_std(values):
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    out = []
    for keep, method in [(1.0, "dense")] + [(k, m) for k in keeps for m in methods]:
        sel = [r for r in rows if r["budget_kept"] == keep and r["method"] == method]
        acc, acc_std = mean_std([r["accuracy"] for r in sel])
        dense, dense_std = mean_std([r["accuracy_dense"] for r in sel])
        out.append({"budget_kept": keep, "method": method, "folds": len(sel), "accuracy_mean": round(acc, 4),
                    "accuracy_std": round(acc_std, 4), "accuracy_dense_mean": round(dense, 4),
                    "accuracy_dense_std": round(dense_std, 4),
                    "params": round(statistics.fmean(r["params"] for r in sel)),
                    "param_reduction": round(statistics.fmean(r["param_reduction"] for r in sel), 4),
                    "flops_ratio": round(statistics.fmean(r["flops_ratio"] for r in sel), 4),
                    "compression_s": round(statistics.fmean(r["compression_s"] for r in sel), 1),
                    "finetune_s": round(statistics.fmean(r.get("finetune_s", 0.0) for r in sel), 1),
                    "job_wall_s": round(statistics.fmean(r["job_wall_s"] for r in sel), 1)})
    return out


def previous_rows(path: Path, keeps: list[float], methods: list[str], folds: int) -> list[dict]:
    """The per-fold rows of an earlier run that this one does not redo (--update): every row except the dense ones
    and those of a (budget, method) run now."""
    if not path.exists():
        raise SystemExit(f"--update: no earlier per-fold results at {path}; run without --update first")
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {k: (v if k == "method" else int(float(v)) if k in ("fold", "params") else float(v))
                   for k, v in r.items() if v != ""}
            if row["fold"] >= folds:
                raise SystemExit(f"--update: {path} has fold {row['fold']}, but --folds={folds}; use the same folds")
            if row["method"] != "dense" and not (row["budget_kept"] in keeps and row["method"] in methods):
                rows.append(row)
    return rows


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows + this run's, checking that both fine-tuned the same dense models (the fine-tuning is
    deterministic, so the earlier rows were pruned from the same models this run prunes)."""
    dense = {r["fold"]: r["accuracy_dense"] for r in new if r["method"] == "dense"}
    for r in old:
        if abs(r["accuracy_dense"] - dense[r["fold"]]) > 1e-3:
            raise SystemExit(f"--update: fold {r['fold']}'s dense model now scores {dense[r['fold']]:.4f}, the "
                             f"earlier {r['method']} row was pruned from one scoring {r['accuracy_dense']:.4f}; "
                             "rerun every method instead")
    order = ["dense", *BASELINES, *VARIANTS, RECOVERED]
    return sorted([r for r in new if r["method"] == "dense"] + old + [r for r in new if r["method"] != "dense"],
                  key=lambda r: (r["fold"], -r["budget_kept"], order.index(r["method"])))


def markdown_row(r: dict) -> str:
    seconds = f"(fine-tuning {r['finetune_s']})" if r["method"] == "dense" else r["compression_s"]
    return (f"| {r['budget_kept']} | {r['method']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
            f"{r['accuracy_dense_mean']:.3f} ± {r['accuracy_dense_std']:.3f} | {r['params']:,} | "
            f"{r['param_reduction']:.1%} | {r['flops_ratio']:.3f} | {seconds} |")


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (>= 2)")
    p.add_argument("--budgets", default="0.8,0.5", help="kept parameter shares (embeddings counted)")
    p.add_argument("--methods", default=",".join(BASELINES + VARIANTS + (RECOVERED,)))
    p.add_argument("--steps", type=int, default=50, help="mask-training steps of the VTrans variants (batch 4)")
    p.add_argument("--mask-lr", type=float, default=0.01,
                   help="mask learning rate of the VTrans variants: 0.01, not the LM default 0.05, which let the masks "
                        "(~10K free scales) overfit the 160 training sentences (fold 0, Faster-VTrans at 20 %%: 0.50 "
                        "held-out accuracy at 0.05, 0.825 at 0.01)")
    p.add_argument("--init-from", default="activation", choices=["", "magnitude", "activation", "taylor"],
                   help="the VTrans variants' warm start (mask.init_from): activation, not the LM default taylor, "
                        "whose Fisher ranking of this fine-tuned classifier is poor at 50 %% (fold 0, Faster-VTrans at "
                        "50 %%: 0.55 held-out accuracy from taylor, 0.75 from activation)")
    p.add_argument("--dense-steps", type=int, default=30, help="dense fine-tuning steps (3 epochs of 160 at batch 16)")
    p.add_argument("--dense-lr", type=float, default=2e-4)
    p.add_argument("--dense-batch", type=int, default=16, help="batch of dense and recovery fine-tuning")
    p.add_argument("--recovery-steps", type=int, default=30)
    p.add_argument("--recovery-lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/quality_cls", help="job output directories (metrics.json of each)")
    p.add_argument("--keep-models", action="store_true",
                   help="keep every saved model and checkpoint (else only metrics.json)")
    p.add_argument("--vib", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the VTrans variants only (repeatable), e.g. --vib mask.init_from=activation")
    p.add_argument("--results", default="bench/results", help="where the tables go")
    p.add_argument("--update", action="store_true",
                   help="rerun only --methods at --budgets and merge them into the per-fold results already in "
                        "--results (the other rows kept; refused if the dense models differ), then rewrite the tables")
    args = p.parse_args()
    keeps = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(BASELINES + VARIANTS + (RECOVERED,)))
    if unknown or args.folds < 2:
        p.error(f"unknown methods {unknown}" if unknown else f"--folds={args.folds} must be >= 2")
    res = Path(args.results)
    kept_rows = previous_rows(res / "quality_minilm_folds.csv", keeps, methods, args.folds) if args.update else []
    t0 = time.perf_counter()
    rows = [r for fold in range(args.folds) for r in run_fold(fold, keeps, methods, args)]
    total = time.perf_counter() - t0
    if args.update:
        rows = merged(kept_rows, rows)
        order = list(BASELINES + VARIANTS + (RECOVERED,))
        methods = sorted({r["method"] for r in rows} - {"dense"}, key=order.index)
        keeps = sorted({r["budget_kept"] for r in rows} - {1.0}, reverse=True)
    table = aggregate(rows, keeps, methods)

    res.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))  # the dense rows carry two more columns
    write_csv(res / "quality_minilm_folds.csv", [{k: round(r[k], 4) if isinstance(r.get(k), float) else r.get(k, "")
                                                  for k in fields} for r in rows])
    write_csv(res / "quality_minilm.csv", table)
    start = {"": "the plain initialisation", "activation": "an activation warm start"}.get(
        args.init_from, f"a {args.init_from} warm start")
    lines = [f"MiniLM (all-MiniLM-L6-v2) fine-tuned and pruned on Pang & Lee polarity (200 sentences), {args.folds}-fold "
             f"cross-validation: held-out accuracy mean ± std (sample std) over the folds; params, FLOPs ratio "
             f"(per token at {args.seq_len} tokens) and compression time (mask training / scoring, + recovery "
             f"fine-tuning) averaged. Mask-training steps {args.steps} x 4 at mask lr {args.mask_lr:g} from {start}, "
             f"dense fine-tuning {args.dense_steps} x "
             f"{args.dense_batch} at lr {args.dense_lr:g}, recovery {args.recovery_steps} x {args.dense_batch} at lr "
             f"{args.recovery_lr:g}. Bench wall time {total:.0f} s"
             f"{f' (this run: {args.methods} at {args.budgets}, merged into the earlier rows)' if args.update else ''}.",
             "",
             "| kept | method | held-out accuracy | dense fine-tuned | params | reduction | FLOPs ratio | compression s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [markdown_row(r) for r in table]
    (res / "quality_minilm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
