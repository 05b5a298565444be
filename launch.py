"""vtrans entry point: `python launch.py [overrides]` composes conf/ and runs the chosen job. Under torchrun, the
DeepSpeed launcher or srun it derives this process's rank; SIGTERM / SIGINT stop the job (training saves a
checkpoint first; exit 143 / 130), SIGUSR1 makes training checkpoint and go on (see vtrans.checkpoint)."""
import hydra
from omegaconf import DictConfig

import vtrans.config  # noqa: F401  registers the schema


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from vtrans.checkpoint import install_signal_handlers
    from vtrans.cluster import dist_env, export_dist_env
    from vtrans.jobs import run

    export_dist_env(dist_env())
    install_signal_handlers()
    metrics = run(cfg)
    return metrics.get("objective")


if __name__ == "__main__":
    main()
