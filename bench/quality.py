"""Quality at equal budgets, in the calibration domain and across domains: VTrans variants against one-shot baselines
and an external library (Torch-Pruning) on real models, side by side.

For each budget (parameter reduction, embeddings counted) it runs the prune job with every method on the same model,
training data, held-out split and evaluation domains (eval.domains of conf/config.yaml: the default job's), and writes
a Markdown and a CSV table into bench/results/: per method, the perplexity ratio to dense on the held-out split of the
calibration data and on every other domain, and the geometric mean of the domain ratios. Usage:

    python bench/quality.py                                   # SmolLM2-135M, 20 % and 50 %, every method
    python bench/quality.py --budgets 0.8 --methods activation,faster --steps 60 --tuning
    python bench/quality.py --join smollm2_0.8,smollm2_0.5 --tag smollm2      # one table from two runs' CSVs
    python bench/quality.py --methods vtrans --recovery data.mix.1.source=teacher:1024 --dry-run   # configs only

`--tuning` drops the final-test domain (FINAL_TEST): tuning runs never evaluate it. `--prose-check` adds two
Wikipedia-style articles (PROSE_CHECK), reported as their own mean and kept out of the others, so a lever that only
favours the documentation-heavy development set shows there. The pruned models stay in --out
(runs/quality/<method>-<kept>/model) for bench/speed.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
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
EXTERNAL = ("torch_pruning", "torch_pruning_taylor")  # bench/external.py: the library's LLM recipe / its Taylor
VARIANTS = ("faster", "fast", "vtrans")
NAMES = {"faster": "Faster-VTrans", "fast": "Fast-VTrans", "vtrans": "VTrans", "recovery": "VTrans + recovery",
         "torch_pruning": "Torch-Pruning (LLM example)", "torch_pruning_taylor": "Torch-Pruning, Taylor"}
# The final-test domain, chosen before any tuning: no tuning run evaluates it (--tuning drops it). See bench/README.md.
FINAL_TEST = "wiki"
# --prose-check: general prose beside the documentation-heavy development set, reported apart from every mean (gensim's
# two Wikipedia-style articles, never calibrated or trained on). See bench/README.md.
PROSE_CHECK = {"ency_nyc": "gensim:para2para_text1.txt", "ency_berlin": "gensim:para2para_text2.txt"}
CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]) -> Config:
    """The config a user gets from `python launch.py <overrides>` (the same YAML groups, e.g. conf/mask/fast.yaml)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return load_config(hydra_compose("config", overrides=overrides))


def common(args) -> list[str]:
    out = [f"data.seq_len={args.seq_len}", f"data.max_eval_blocks={args.eval_blocks}",
           f"eval.domain_blocks={args.domain_blocks}", "progress=false", "logger=none", *args.set]
    if args.tuning:
        out.append(f"~eval.domains.{FINAL_TEST}")
    if args.prose_check:
        out += [f"+eval.domains.{d}={src}" for d, src in PROSE_CHECK.items()]
    return out


def budget(keep: float) -> list[str]:
    """The packaged budget group for this share where there is one (conf/budget/params50.yaml carries the mask rate
    measured best at 50 %), so a row is what `python launch.py budget=params50 ...` runs; else the target alone."""
    group = {0.8: "params80", 0.5: "params50"}.get(keep)
    return [f"budget={group}"] if group else [f"budget.target={keep}"]


def config(method: str, keep: float, args) -> Config:
    if method in VARIANTS:
        mask = [f"mask={method}", f"optim.steps={args.steps}", *args.vib]
    elif method in EXTERNAL:  # bench/external.py reads its importance off mask.method
        mask = ["mask.method=" + ("magnitude" if method == "torch_pruning" else "taylor")]
    else:
        mask = [f"mask.method={method}"]
    return compose([*mask, *budget(keep), *common(args),
                    f"output_dir={Path(args.out) / f'{method}-{keep}'}"])


def recovery_config(model_dir: str, keep: float, args) -> Config:
    return compose(["job=finetune", f"model_dir={model_dir}", f"finetune.steps={args.recovery_steps}",
                    f"finetune.lr={args.recovery_lr}", *common(args), *args.recovery,
                    f"output_dir={Path(args.out) / f'recovery-{keep}'}"])


def dry_run(args) -> None:
    """Every config a run with these arguments would start, composed and validated (a bad override fails here, before
    a model is loaded or a GPU held), one line each: the job, the training data and steps."""
    for keep in (float(b) for b in args.budgets.split(",")):
        for method in args.methods.split(","):
            cfgs = [(method, config(method, keep, args))]
            if method == "vtrans" and args.recovery_steps > 0:
                cfgs.append(("recovery", recovery_config(str(Path(args.out) / f"vtrans-{keep}" / "model"), keep, args)))
            for name, c in cfgs:
                steps = c.finetune.steps if c.job == "finetune" else c.optim.steps
                mix = ", ".join(f"{m.source} x{m.weight:g}" for m in c.data.mix) or c.data.source
                print(f"{keep} {name}: job={c.job} steps={steps} data=[{mix}] "
                      f"teacher_batch_size={c.data.teacher_batch_size} device={c.device} output_dir={c.output_dir}")


def row(keep: float, method: str, m: dict, seconds: float, wall: float, new: str = "pruned") -> dict:
    domains = list(m.get("eval_domains", {}))
    r = {"budget_kept": keep, "method": method, "params": m["params_pruned"],
         "param_reduction": round(m["param_reduction"], 4), "ppl_dense": round(m["ppl_dense"], 3),
         "ppl": round(m[f"ppl_{new}"], 3), "ratio_calibration": round(m[f"ppl_{new}"] / m["ppl_dense"], 4)}
    for d in domains:
        r[f"ppl_{d}_dense"] = round(m[f"ppl_{d}_dense"], 3)
        r[f"ppl_{d}"] = round(m[f"ppl_{d}_{new}"], 3)
        r[f"ratio_{d}"] = round(m[f"ppl_{d}_{new}"] / m[f"ppl_{d}_dense"], 4)
    r.update(summary(r, domains))
    r.update({"flops_ratio": round(m["flops_pruned"] / m["flops_dense"], 4) if m.get("flops_dense") else "",
              "compression_s": round(seconds, 1), "job_wall_s": round(wall, 1), "model_dir": m.get("model_dir", "")})
    return r


def summary(r: dict, domains: list[str]) -> dict:
    """Geometric means of the domain ratios: over the development domains (every domain but the final test and the
    prose check), over those and the final test (the cross-domain headline, ppl_ratio_cross_domain) and, when
    evaluated, over the prose check's articles (ratio_prose_check), which no other mean includes."""
    def gmean(ds):
        return round(math.exp(sum(math.log(r[f"ratio_{d}"]) for d in ds) / len(ds)), 4) if ds else ""
    prose = [d for d in domains if d in PROSE_CHECK]
    main = [d for d in domains if d not in PROSE_CHECK]
    out = {"ratio_dev_mean": gmean([d for d in main if d != FINAL_TEST]), "ratio_cross_domain": gmean(main)}
    if prose:
        out["ratio_prose_check"] = gmean(prose)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.8,0.5", help="kept parameter shares")
    p.add_argument("--methods", default=",".join(BASELINES + EXTERNAL + VARIANTS),
                   help="baselines, Torch-Pruning rows and variants; vtrans is followed by recovery fine-tuning unless "
                        "--recovery-steps 0")
    p.add_argument("--steps", type=int, default=100, help="mask-training steps of the VTrans variants")
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--recovery-lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=0, help="held-out blocks of the calibration data; 0 = all")
    p.add_argument("--domain-blocks", type=int, default=32, help="blocks per evaluation domain (eval.domain_blocks)")
    p.add_argument("--tuning", action="store_true", help=f"drop the final-test domain ({FINAL_TEST}) from evaluation")
    p.add_argument("--prose-check", action="store_true",
                   help="also evaluate gensim's two Wikipedia-style articles (PROSE_CHECK), reported as their own "
                        "mean, outside the development and cross-domain means")
    p.add_argument("--out", default="runs/quality", help="run directories (pruned models for bench/speed.py)")
    p.add_argument("--results", default="bench/results", help="where the tables go")
    p.add_argument("--tag", default="smollm2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for every method and recovery (repeatable), e.g. the training data")
    p.add_argument("--vib", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the VTrans variants only (repeatable), e.g. --vib mask.init_spread=4")
    p.add_argument("--recovery", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for recovery fine-tuning only (repeatable)")
    p.add_argument("--join", default="", help="comma-separated tags of earlier runs: write one table from their CSVs")
    p.add_argument("--dry-run", action="store_true",
                   help="compose and validate every job's config (recovery included), print them and stop: no model "
                        "is loaded, nothing is written")
    args = p.parse_args()
    accepted = BASELINES + EXTERNAL + VARIANTS
    unknown = [m for m in args.methods.split(",") if m not in accepted]
    if unknown and not args.join:  # before any model loads (recovery follows vtrans; it is not a method of its own)
        p.error(f"--methods {','.join(unknown)} not accepted; choose from {','.join(accepted)} (vtrans is followed by "
                f"recovery fine-tuning unless --recovery-steps 0)")
    if args.dry_run:
        dry_run(args)
        return
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    if args.join:
        rows = []
        for tag in args.join.split(","):
            with open(out / f"quality_{tag}.csv") as f:
                rows += list(csv.DictReader(f))
        _write(rows, out, args, {})
        print((out / f"quality_{args.tag}.md").read_text())
        return
    rows, protocol = [], {}  # protocol: the last job that reports the evaluation protocol (external rows do not)
    for keep in (float(b) for b in args.budgets.split(",")):
        for method in args.methods.split(","):
            t = time.perf_counter()
            if method in EXTERNAL:
                from bench.external import run as external_run

                m = external_run(config(method, keep, args))
            else:
                m = run(config(method, keep, args))
            rows.append(row(keep, method, m, m["train_time_s"], time.perf_counter() - t))
            print(json.dumps(rows[-1]), flush=True)
            if method == "vtrans" and args.recovery_steps > 0:
                t = time.perf_counter()
                f = run(recovery_config(m["model_dir"], keep, args))
                r = dict(m, ppl_after=f["ppl_after"], model_dir=f.get("model_dir", ""),
                         **{f"ppl_{d}_after": f[f"ppl_{d}_after"] for d in m.get("eval_domains", {})})
                rows.append(row(keep, "recovery", r, m["train_time_s"] + f["train_time_s"],
                                rows[-1]["job_wall_s"] + time.perf_counter() - t, new="after"))
                print(json.dumps(rows[-1]), flush=True)
            protocol = m if "eval_tokens" in m else protocol
            _write(rows, out, args, protocol)
    print((out / f"quality_{args.tag}.md").read_text())


def _write(rows: list[dict], out: Path, args, m: dict) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"quality_{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    domains = [k[len("ratio_"):] for k in fields if k.startswith("ratio_") and k not in
               ("ratio_calibration", "ratio_dev_mean", "ratio_cross_domain", "ratio_prose_check")]
    prose = [d for d in domains if d in PROSE_CHECK]
    dev = [d for d in domains if d != FINAL_TEST and d not in PROSE_CHECK]
    head = ["kept", "method", "reduction", "calibration (held-out)", *dev, "dev mean"]
    if FINAL_TEST in domains:
        head += [f"{FINAL_TEST} (final test)", "cross-domain mean"]
    if prose:
        head += [*prose, "prose check mean"]
    head.append("compression s")
    lines = []
    if m:
        lines += [f"Perplexity ratios to the dense model (lower is better): the held-out split of the calibration "
                  f"data ({m.get('eval_tokens', '?')} tokens, {m.get('eval_protocol', '')} of {args.seq_len}) and "
                  f"{args.domain_blocks} evenly spaced {args.seq_len}-token blocks of each other domain; means are "
                  "geometric. Parameters counted with embeddings.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    first = rows[0] if rows else {}
    dense = ["", "dense ppl", "", f"{float(first.get('ppl_dense', 0)):.2f}",
             *[f"{float(first.get(f'ppl_{d}_dense', 0)):.2f}" for d in dev], ""]
    if FINAL_TEST in domains:
        dense += [f"{float(first.get(f'ppl_{FINAL_TEST}_dense', 0)):.2f}", ""]
    if prose:
        dense += [*[f"{float(first.get(f'ppl_{d}_dense', 0)):.2f}" for d in prose], ""]
    lines.append("| " + " | ".join(dense + [""]) + " |")
    for r in rows:
        cells = [str(r["budget_kept"]), NAMES.get(r["method"], r["method"]), f"{float(r['param_reduction']):.1%}",
                 _x(r["ratio_calibration"]), *[_x(r.get(f"ratio_{d}")) for d in dev], _x(r.get("ratio_dev_mean"))]
        if FINAL_TEST in domains:
            cells += [_x(r.get(f"ratio_{FINAL_TEST}")), f"**{_x(r.get('ratio_cross_domain'))}**"]
        if prose:
            cells += [*[_x(r.get(f"ratio_{d}")) for d in prose], _x(r.get("ratio_prose_check"))]
        cells.append(str(r["compression_s"]))
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"quality_{args.tag}.md").write_text("\n".join(lines) + "\n")


def _x(v) -> str:
    if v in (None, ""):
        return ""
    v = float(v)
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"


if __name__ == "__main__":
    main()
