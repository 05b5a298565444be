"""Jobs: each is `run(cfg, out) -> metrics`, built from the stages in vtrans.pipeline; `run` here validates the
config, claims the output directory (refusing another config's run there), dispatches on `job`, picks the job's
objective (the metric sweeps optimise and plot) and writes metrics.json on rank 0 (strict JSON: non-finite values as
null, listed under `non_finite_keys`)."""
from __future__ import annotations

import importlib
import logging

from .. import hostmem
from ..cluster import dist_env
from ..config import load_config
from ..checkpoint import Stopped, check_stop
from ..pipeline import check_world_size, claim_output, is_main_process, output_dir, set_objective, write_metrics

log = logging.getLogger("vtrans")


def run(cfg) -> dict:
    """Validate the config and claim the output directory (before any model is loaded), run the chosen job, write
    metrics.json (rank 0)."""
    cfg = load_config(cfg)
    world = dist_env().world_size
    if cfg.deepspeed.enabled and cfg.deepspeed.host_mmap_threshold and world > 1:  # a rank's own process
        hostmem.cap_heap(cfg.deepspeed.host_mmap_threshold)  # before anything is loaded
    check_world_size(cfg, world)
    out = output_dir(cfg)
    main = is_main_process()
    claim_output(cfg, out)
    check_stop()
    job = importlib.import_module(f"{__name__}.{cfg.job}").run
    try:
        metrics = job(cfg, out)
    except Stopped as e:
        log.warning("%s: %s", cfg.job, e)  # the exit code alone does not say why the job ended
        raise
    metrics.setdefault("job", cfg.job)
    set_objective(cfg, metrics)
    if main:
        write_metrics(out, metrics)
    return metrics
