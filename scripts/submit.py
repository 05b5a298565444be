"""Submits a named run (jobs/<name>.yaml: sbatch template, resources, seeds, launch.py overrides) to Slurm: one
job per seed, each writing to runs/<name>/seed<seed>, a fixed directory, so a requeued job resumes its checkpoint.

    python scripts/submit.py jobs/smollm2_faster_zero3.yaml [--dry-run] [extra overrides...]

The config of every seed is composed and validated before anything is submitted.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
KEYS = {"template", "sbatch", "seeds", "overrides"}


def load_job(path: Path) -> dict:
    job = OmegaConf.to_container(OmegaConf.load(path))
    unknown = set(job) - KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a job file holds {sorted(KEYS)}")
    template = REPO / "slurm" / f"{job['template']}.sbatch"
    if not template.is_file():
        raise FileNotFoundError(f"{path}: template={job['template']!r}: no {template.relative_to(REPO)}")
    return {"template": template, "sbatch": dict(job.get("sbatch") or {}), "seeds": list(job.get("seeds") or [0]),
            "overrides": list(job.get("overrides") or [])}


def launch_overrides(job: dict, seed: int, out: Path, extra: list[str] = ()) -> list[str]:
    """launch.py's overrides for one seed (without Hydra's own keys)."""
    return [*job["overrides"], *extra, f"optim.seed={seed}", f"output_dir={out}"]


def world_size(job: dict) -> int:
    """The number of processes the job's sbatch options start (nodes x tasks per node)."""
    options = job["sbatch"]
    return int(options.get("nodes", 1)) * int(options.get("ntasks-per-node", 1))


def validate(overrides: list[str], world: int = 1) -> None:
    """Compose conf/ with the overrides and run the schema's checks and those the number of processes decides, as
    launch.py would, without training."""
    from hydra import compose, initialize_config_dir

    import vtrans.config as config
    from vtrans.pipeline import check_world_size

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        check_world_size(config.load_config(compose(config_name="config", overrides=overrides)), world)


def sbatch_command(name: str, job: dict, seed: int, out: Path, extra: list[str] = ()) -> list[str]:
    options = [f"--{k}={v}" for k, v in job["sbatch"].items()]
    return ["sbatch", f"--job-name={name}-s{seed}", *options, f"--output={out}/slurm-%j.out",
            str(job["template"].relative_to(REPO)), *launch_overrides(job, seed, out, extra),
            f"hydra.run.dir={out}/hydra"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", type=Path, help="jobs/<name>.yaml")
    p.add_argument("extra", nargs="*", help="more launch.py overrides (they win)")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs")
    p.add_argument("--dry-run", action="store_true", help="validate and print the sbatch commands only")
    args = p.parse_args(argv)
    job, name = load_job(args.job), args.job.stem
    runs = [(seed, args.runs_dir.resolve() / name / f"seed{seed}") for seed in job["seeds"]]
    for seed, out in runs:
        validate(launch_overrides(job, seed, out, args.extra), world_size(job))
    for seed, out in runs:
        cmd = sbatch_command(name, job, seed, out, args.extra)
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            out.mkdir(parents=True, exist_ok=True)
            subprocess.run(cmd, cwd=REPO, check=True)  # the template runs launch.py from the submit directory


if __name__ == "__main__":
    sys.exit(main())
