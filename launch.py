"""vtrans entry point: `python launch.py [overrides]` composes conf/ and runs the chosen job."""
import hydra
from omegaconf import DictConfig

import vtrans.config  # noqa: F401  registers the schema


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from vtrans.jobs import run

    metrics = run(cfg)
    return metrics.get("objective")


if __name__ == "__main__":
    main()
