"""vtrans entry point: `python launch.py [overrides]` composes conf/ and runs the chosen job. Under torchrun, the
DeepSpeed launcher or srun it derives this process's rank; SIGTERM / SIGINT stop the job (training saves a
checkpoint first; exit 143 / 130), SIGUSR2 too (Slurm's warning before a time limit; under submitit its own handler
then requeues the job), SIGUSR1 makes training checkpoint and go on (see vtrans.checkpoint)."""
import hydra
from omegaconf import DictConfig

import vtrans.config  # noqa: F401  registers the schema


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from vtrans.checkpoint import Stopped, hand_over, install_signal_handlers
    from vtrans.cluster import dist_env, export_dist_env
    from vtrans.jobs import run

    export_dist_env(dist_env())
    install_signal_handlers()
    try:
        metrics = run(cfg)
    except Stopped:  # after a stop checkpoint, or stopped where there was nothing to save
        hand_over()  # e.g. submitit's USR2 handler: requeue this job, then exit
        raise
    return metrics.get("objective")


if __name__ == "__main__":
    main()
