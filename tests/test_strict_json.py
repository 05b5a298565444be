"""Strict JSON (vtrans.strict_json): non-finite values become null and are listed; tensors and numpy values become
plain numbers; the text parses with a parser that rejects NaN / Infinity."""
import math

import numpy as np
import pytest
import torch

from vtrans.strict_json import NON_FINITE_KEY, dumps, loads, sanitize


def test_non_finite_values_become_null_and_are_listed():
    value = {"ppl": math.inf, "nll": float("nan"), "ok": 1.5, "layers": [1.0, -math.inf],
             "nested": {"loss": np.float32("nan"), "steps": np.int64(3)}, "t": torch.tensor([1.0, math.inf]),
             "flag": True, "name": "x", "none": None}
    clean, found = sanitize(value)
    assert clean == {"ppl": None, "nll": None, "ok": 1.5, "layers": [1.0, None],
                     "nested": {"loss": None, "steps": 3}, "t": [1.0, None], "flag": True, "name": "x", "none": None}
    assert found == ["ppl", "nll", "layers[1]", "nested.loss", "t[1]"]
    parsed = loads(dumps(value, flag=True))
    assert parsed[NON_FINITE_KEY] == found and parsed["ppl"] is None


def test_checkpoint_state_is_strict_json(tmp_path):
    """trainer_state.json holds every step's statistics; a non-finite one (e.g. an inf gradient norm) is null there."""
    from vtrans.checkpoint import STATE_FILE, Checkpointer, TrainState
    from vtrans.engine import Engine

    module = torch.nn.Linear(2, 2)
    engine = Engine(module, [{"params": list(module.parameters()), "lr": 0.1}])
    history = [{"step": 1, "loss": 1.0, "grad_norm": math.inf}]
    path = Checkpointer(tmp_path).save(engine, TrainState(step=1, samples=4, history=history))
    state = loads((path / STATE_FILE).read_text())
    assert state["history"] == [{"step": 1, "loss": 1.0, "grad_norm": None}]
    assert Checkpointer(tmp_path).restore(Engine(module, [{"params": list(module.parameters()), "lr": 0.1}])).step == 1


def test_the_strict_parser_rejects_what_python_json_writes_by_default():
    import json

    with pytest.raises(ValueError, match="not strict JSON"):
        loads(json.dumps({"ppl": math.inf}))
    assert loads(dumps({"ppl": 2.0}, flag=True)) == {"ppl": 2.0, NON_FINITE_KEY: []}
