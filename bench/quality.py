"""Quality at equal budgets: VTrans variants against one-shot baselines on real models, side by side.

For each budget (parameter reduction, embeddings counted) it runs the prune job with every method on the
same model, data split and evaluation, and writes a Markdown and a CSV table (held-out perplexity or
accuracy, parameters, FLOPs, compression wall time) into bench/results/. Usage:

    python bench/quality.py                                   # SmolLM2-135M on the Lee corpus, 20 % and 50 %
    python bench/quality.py --budgets 0.8 --methods activation,faster --steps 60
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtrans.config import Config  # noqa: E402
from vtrans.jobs import run  # noqa: E402

BASELINES = ("random", "magnitude", "activation", "taylor")
VARIANTS = ("faster", "fast", "vtrans")


def config(method: str, keep: float, args) -> Config:
    c = Config()
    c.data.seq_len, c.data.max_eval_blocks = args.seq_len, args.eval_blocks
    c.budget.target = keep
    c.optim.steps = args.steps
    c.progress = False
    if method in BASELINES:
        c.mask.method = method
    else:
        c.mask.variant = method
        if method == "vtrans":
            c.finetune.steps = args.recovery_steps
    c.output_dir = str(Path(args.out) / f"{method}-{keep}")
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.8,0.5", help="kept parameter shares")
    p.add_argument("--methods", default=",".join(BASELINES + VARIANTS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=0)
    p.add_argument("--out", default="bench/results/quality_runs")
    args = p.parse_args()
    rows = []
    for keep in (float(b) for b in args.budgets.split(",")):
        for method in args.methods.split(","):
            t = time.perf_counter()
            m = run(config(method, keep, args))
            rows.append({"budget_kept": keep, "method": method, "params": m["params_pruned"],
                         "param_reduction": round(m["param_reduction"], 4), "ppl_dense": round(m["ppl_dense"], 3),
                         "ppl": round(m["ppl_pruned"], 3), "flops_ratio": round(m["flops_pruned"] / m["flops_dense"], 4),
                         "compression_s": round(m["train_time_s"], 1), "job_wall_s": round(time.perf_counter() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "quality_smollm2.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| kept | method | params | reduction | FLOPs ratio | held-out ppl (dense) | compression s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['budget_kept']} | {r['method']} | {r['params']:,} | {r['param_reduction']:.1%} | "
              f"{r['flops_ratio']:.3f} | {r['ppl']} ({r['ppl_dense']}) | {r['compression_s']} |" for r in rows]
    (out / "quality_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
