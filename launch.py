"""vtrans entry point: `python launch.py [overrides]` composes conf/ and runs the chosen job. Under torchrun, the
DeepSpeed launcher or srun it derives this process's rank; SIGTERM / SIGUSR2 / SIGUSR1 make training checkpoint (see
vtrans.checkpoint); after a stop checkpoint, submitit's own handler requeues the job."""
import hydra
from omegaconf import DictConfig

import vtrans.config  # noqa: F401  registers the schema


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from vtrans.checkpoint import Preempted, hand_over, install_signal_handlers
    from vtrans.cluster import dist_env, export_dist_env
    from vtrans.jobs import run

    export_dist_env(dist_env())
    install_signal_handlers()
    try:
        metrics = run(cfg)
    except Preempted:
        hand_over()  # e.g. submitit's USR2 handler: requeue this job, then exit
        raise
    return metrics.get("objective")


if __name__ == "__main__":
    main()
