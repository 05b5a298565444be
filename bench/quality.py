"""Quality at equal budgets: VTrans variants against one-shot baselines on real models, side by side.

For each budget (parameter reduction, embeddings counted) it runs the prune job with every method on the
same model, data split and evaluation, and writes a Markdown and a CSV table (held-out perplexity or
accuracy, parameters, FLOPs, compression wall time) into bench/results/. Usage:

    python bench/quality.py                                   # SmolLM2-135M on the Lee corpus, 20 % and 50 %
    python bench/quality.py --budgets 0.8 --methods activation,faster --steps 60

The pruned models stay in --out (runs/quality/<method>-<kept>/model) for bench/speed.py.
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

from vtrans.config import Config, load_config  # noqa: E402
from vtrans.jobs import run  # noqa: E402

BASELINES = ("random", "magnitude", "activation", "taylor")
VARIANTS = ("faster", "fast", "vtrans")
NAMES = {"faster": "Faster-VTrans", "fast": "Fast-VTrans", "vtrans": "VTrans", "recovery": "VTrans + recovery"}


CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]) -> Config:
    """The config a user gets from `python launch.py <overrides>` (the same YAML groups, e.g. conf/mask/fast.yaml)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return load_config(hydra_compose("config", overrides=overrides))


def config(method: str, keep: float, args) -> Config:
    mask = [f"mask.method={method}"] if method in BASELINES else [f"mask={method}", *args.vib]
    return compose([*mask, f"budget.target={keep}", f"data.seq_len={args.seq_len}",
                    f"data.max_eval_blocks={args.eval_blocks}", f"optim.steps={args.steps}", "progress=false",
                    "logger=none", f"output_dir={Path(args.out) / f'{method}-{keep}'}"])


def recovery_config(model_dir: str, keep: float, args) -> Config:
    return compose(["job=finetune", f"model_dir={model_dir}", f"data.seq_len={args.seq_len}",
                    f"data.max_eval_blocks={args.eval_blocks}", f"finetune.steps={args.recovery_steps}",
                    f"finetune.lr={args.recovery_lr}", "progress=false", "logger=none",
                    f"output_dir={Path(args.out) / f'recovery-{keep}'}"])


def row(keep: float, method: str, m: dict, seconds: float, wall: float) -> dict:
    return {"budget_kept": keep, "method": method, "params": m["params_pruned"],
            "param_reduction": round(m["param_reduction"], 4), "ppl_dense": round(m["ppl_dense"], 3),
            "ppl": round(m["ppl_pruned"], 3), "ppl_ratio": round(m["ppl_pruned"] / m["ppl_dense"], 3),
            "flops_ratio": round(m["flops_pruned"] / m["flops_dense"], 4), "compression_s": round(seconds, 1),
            "job_wall_s": round(wall, 1), "model_dir": m.get("model_dir", "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.8,0.5", help="kept parameter shares")
    p.add_argument("--methods", default=",".join(BASELINES + VARIANTS),
                   help="baselines and variants; vtrans is followed by recovery fine-tuning unless --recovery-steps 0")
    p.add_argument("--steps", type=int, default=100, help="mask-training steps of the VTrans variants")
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--recovery-lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=0, help="0 = the whole held-out split")
    p.add_argument("--out", default="runs/quality", help="run directories (pruned models for bench/speed.py)")
    p.add_argument("--results", default="bench/results", help="where the tables go")
    p.add_argument("--tag", default="smollm2")
    p.add_argument("--vib", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the VTrans variants only (repeatable), e.g. --vib mask.init_spread=4")
    args = p.parse_args()
    rows = []
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    for keep in (float(b) for b in args.budgets.split(",")):
        for method in args.methods.split(","):
            t = time.perf_counter()
            m = run(config(method, keep, args))
            rows.append(row(keep, method, m, m["train_time_s"], time.perf_counter() - t))
            print(json.dumps(rows[-1]), flush=True)
            if method == "vtrans" and args.recovery_steps > 0:
                t = time.perf_counter()
                f = run(recovery_config(m["model_dir"], keep, args))
                r = dict(m, ppl_pruned=f["ppl_after"], model_dir=f.get("model_dir", ""))
                rows.append(row(keep, "recovery", r, m["train_time_s"] + f["train_time_s"],
                                rows[-1]["job_wall_s"] + time.perf_counter() - t))
                print(json.dumps(rows[-1]), flush=True)
            _write(rows, out, args, m)
    print((out / f"quality_{args.tag}.md").read_text())


def _write(rows: list[dict], out: Path, args, m: dict) -> None:
    with open(out / f"quality_{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    protocol = (f"Held-out perplexity: {m.get('eval_protocol', '')}, {m.get('eval_tokens', '?')} tokens of held-out "
                f"documents never trained on (window {m.get('eval_window')}, stride {m.get('eval_stride')}). VTrans "
                f"variants: {args.steps} mask-training steps of {m.get('train_tokens', 0) // max(1, args.steps)} tokens; "
                f"recovery: {args.recovery_steps} fine-tuning steps (lr {args.recovery_lr}) distilled from the dense "
                "model. Parameters counted with embeddings; compression time = scoring or training (+ recovery).")
    lines = [protocol, "",
             "| kept | method | params | reduction | FLOPs ratio | held-out ppl | x dense | compression s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['budget_kept']} | {NAMES.get(r['method'], r['method'])} | {r['params']:,} | "
                     f"{r['param_reduction']:.1%} | {r['flops_ratio']:.3f} | {r['ppl']:.2f} (dense {r['ppl_dense']:.2f}) "
                     f"| {r['ppl_ratio']:.2f} | {r['compression_s']} |")
    (out / f"quality_{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
