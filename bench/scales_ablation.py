"""Where a Faster-VTrans model's quality comes from: its decision (which units it keeps) against its masks' learned
scales (each kept unit's mu and, with mask.gains, each block's output gains, folded into the weights at
materialisation).

Reads a finished Faster-VTrans run directory (its run.json config, metrics.json and the end-of-training checkpoint of a
single-process run), rebuilds the masked model from the dense weights and the checkpoint's masks, and materialises the
same decision twice: with the learned scales (what the job saved: its perplexities are reproduced) and with every kept
unit's scale and every gain set to 1 (the selection alone). Both are evaluated on the run's held-out text and
evaluation domains; the ratios to the dense model use the run's own dense perplexities, summarised as
bench/quality.py does.

    OMP_NUM_THREADS=1 python bench/scales_ablation.py runs/s8/default_s0/faster-0.8 [--out scales.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402
from vtrans import pipeline as P  # noqa: E402
from vtrans.checkpoint import Checkpointer  # noqa: E402
from vtrans.config import Config, load_config  # noqa: E402

SETTINGS = ("learned", "unit")  # the masks' learned scales | every kept unit at 1


def run_config(run: Path) -> Config:
    """The run's config from run.json's dotted fields."""
    record = run / P.RUN_RECORD
    if not record.is_file():
        raise FileNotFoundError(f"{record} not found: give the output directory of a finished prune job")
    nested: dict = {}
    for key, value in json.loads(record.read_text())["config"].items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg = load_config(OmegaConf.create(nested))
    if cfg.job != "prune" or cfg.mask.method != "vib" or cfg.mask.variant != "faster":
        raise ValueError(f"{run} ran job={cfg.job} mask.method={cfg.mask.method} mask.variant={cfg.mask.variant}; "
                         "accepted: a Faster-VTrans prune run (job=prune, mask.method=vib, mask.variant=faster), whose "
                         "dense weights and masks define the pruned model")
    return cfg


def mask_states(run: Path, cfg: Config, prefix: str = "mask.") -> dict:
    """{mask name: state dict} from the run's latest end-of-training checkpoint (a single-process engine's); with
    prefix "gain." the blocks' output gains."""
    latest = Checkpointer.from_config(cfg.checkpoint, run, {}).latest()
    if latest is None:
        raise FileNotFoundError(f"no readable checkpoint under {run / 'checkpoints'}: the run must keep its "
                                "end-of-training checkpoint")
    if not (latest / "engine.pt").is_file():
        raise ValueError(f"{latest} holds no engine.pt (a DeepSpeed checkpoint?); accepted: a single-process run's")
    extra = torch.load(latest / "engine.pt", map_location="cpu", weights_only=False)["module"]["_extra_state"]
    return {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}


def ablate(run: Path, settings=SETTINGS) -> dict:
    """{setting: bench/quality.py row (ratios per domain and their means)} for each setting."""
    run = Path(run)
    cfg = run_config(run)
    metrics = json.loads((run / "metrics.json").read_text())
    torch.manual_seed(cfg.optim.seed)
    model, tokenizer = P.load(cfg.model)
    data = P.prepare_data(cfg, tokenizer, dense=lambda: (model, tokenizer))
    domains = P.domain_data(cfg, tokenizer)
    mm = P.attach(cfg, model)
    states = mask_states(run, cfg)
    masks, gains = mm.masks(), mm.gains()
    gain_states = mask_states(run, cfg, "gain.") if gains else {}
    if set(states) != set(masks) or set(gain_states) != set(gains):
        differ = sorted((set(states) ^ set(masks)) | (set(gain_states) ^ set(gains)))
        raise ValueError(f"the checkpoint's masks {differ[:5]} do not match the run's model")
    out = {}
    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; accepted: {list(SETTINGS)}")
        for name, m in masks.items():
            m.load_state_dict(states[name])
            if setting == "unit":
                with torch.no_grad():
                    m.mu.fill_(1.0)
        for name, g in gains.items():
            g.load_state_dict(gain_states[name])
            if setting == "unit":
                with torch.no_grad():
                    g.scale.fill_(1.0)
        pruned = P.materialise(cfg, mm, mm.decision(), build=True)
        m = dict(metrics)
        m["ppl_pruned"] = P.evaluate(pruned, tokenizer, cfg, data.held, "pruned", lm_eval=False)["ppl"]
        m.update(P.evaluate_domains(pruned, cfg, domains, "pruned"))
        out[setting] = Q.row(cfg.budget.target, setting, m, 0.0, 0.0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished Faster-VTrans run directory (run.json, metrics.json, checkpoints)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    rows = ablate(args.run)
    keys = [k for k in next(iter(rows.values())) if k.startswith("ratio_")]
    for setting, r in rows.items():
        print(setting, " ".join(f"{k[len('ratio_'):]}={r[k]}" for k in keys))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
