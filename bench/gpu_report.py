"""Turns the raw results of bench/gpu_check.sh (a folder of logs and JSON) into the Markdown of
bench/results/gpu_check.md, next to the H100 reference figures of the same shapes.

    python bench/gpu_report.py <folder>
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# H100 80GB, bf16, LLaMA-2-7B shape, batch 2 x 2048, no offload (the project's reference measurements)
REFERENCE = {"dense fwd+bwd, all weights trainable": "10,785 tok/s, 37.0 GB",
             "fwd+bwd, weights frozen, head + neuron masks trainable": "13,330 tok/s"}


def result(path: Path) -> dict | None:
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def gib(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def status(path: Path) -> str:
    if not path.is_file():
        return "not run"
    text = path.read_text(errors="replace")
    rc = re.findall(r"rc=(\d+)", text)
    if rc and rc[-1] == "124":
        return "stopped at its time box"
    tail = [l for l in text.splitlines() if l.strip() and not l.startswith("rc=")][-1:] or [""]
    return "ok" if rc and rc[-1] == "0" else f"failed (rc {rc[-1] if rc else '?'}): {tail[0][:200]}"


def main(folder: str) -> str:
    raw = Path(folder)
    lines = ["# GPU check (bench/gpu_check.sh)", ""]
    env = raw / "gpu_env.txt"
    lines.append(f"Machine: {env.read_text().strip() if env.is_file() else 'unknown'}.")
    lines += ["", "## (b) LLaMA-2-7B shape, bf16, ZeRO-3 + CPU offload, batch 2 x 2048 tokens", "",
              "| run | tokens/s | s/step | peak GPU GiB | host RSS GiB | status |", "| --- | --- | --- | --- | --- | --- |"]
    for part, name in (("faster", "Faster-VTrans (weights frozen, offloaded)"),
                       ("vtrans", "VTrans (weights trained, optimizer offloaded)")):
        r, s = result(raw / f"gpu_b_{part}.log"), status(raw / f"gpu_b_{part}.log")
        if r:
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.2f} | "
                         f"{gib(r['peak_gpu_gib'])} | {gib(r['host_rss_gib'])} | {s} |")
        else:
            lines.append(f"| {name} | - | - | - | - | {s} |")
    lines += ["", "Reference (H100, no offload, same shape): "
              + "; ".join(f"{k}: {v}" for k, v in REFERENCE.items()) + ".", ""]
    lines += ["## (c) decide + materialise at 7B shape (50 %)", ""]
    r = result(raw / "gpu_c.log")
    if r:
        lines.append(f"decide {r['decide_s']:.1f} s, materialise {r['materialise_s']:.1f} s; pruned model "
                     f"{r['pruned_params'] / 1e9:.2f}B parameters ({r['pruned_gib']:.1f} GiB); peak GPU "
                     f"{gib(r['peak_gpu_gib'])} GiB; host RSS {r['host_rss_start_gib']:.1f} -> "
                     f"{r['host_rss_end_gib']:.1f} GiB.")
    else:
        lines.append(status(raw / "gpu_c.log"))
    lines += ["", "## (a) the default job, device=cuda", ""]
    metrics = raw / "gpu_a_metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        wall = re.findall(r"wall_s=(\d+)", (raw / "gpu_a.log").read_text())
        lines.append(f"ppl {m.get('ppl_dense', float('nan')):.3f} -> {m.get('ppl_pruned', float('nan')):.3f}, "
                     f"{m.get('params_pruned', 0):,} of {m.get('params_dense', 0):,} parameters, job wall time "
                     f"{m.get('wall_time_s', 0):.0f} s ({wall[-1] if wall else '?'} s with start-up).")
    else:
        lines.append(status(raw / "gpu_a.log"))
    lines += ["", "## (d) speed of the trained SmolLM2 shapes (bench/speed.py --from-config)", ""]
    speed = raw / "gpu_d_speed.md"
    lines.append(speed.read_text().strip() if speed.is_file() else status(raw / "gpu_d.log"))
    text = "\n".join(lines) + "\n"
    return text


if __name__ == "__main__":
    print(main(sys.argv[1]), end="")
