"""Tests of usae_checks: every setting is refused where it enters, with a message that names
the problem; the core behind these checks only asserts."""
import math

import pytest
import torch

import usae_checkpoint as ckpt
import usae_checks as checks
import usae_core as core
from test_core import DIMS, tiny_batches


@pytest.mark.parametrize("dims, n, k, message", [
    ({}, 16, 3, "non-empty"),
    ([("a", 4)], 16, 3, "non-empty mapping"),
    ({"a-b": 3}, 16, 3, "not usable"),
    ({"a": 0}, 16, 3, "width of model 'a'"),
    ({"a": True}, 16, 3, "width of model 'a'"),
    (DIMS, 16, 16, "smaller than n_concepts"),
    (DIMS, 16, 20, "smaller than n_concepts"),
    (DIMS, 16, 0, "k must be a positive integer"),
    (DIMS, 16, -2, "k must be a positive integer"),
    (DIMS, 0, 3, "n_concepts must be a positive integer"),
    (DIMS, 16.0, 3, "n_concepts must be a positive integer")])
def test_impossible_usae_settings_are_refused(dims, n, k, message):
    with pytest.raises(ValueError, match=message):
        checks.check_usae(dims, n, k)


def test_good_usae_settings_pass_and_build():
    checks.check_usae(DIMS, 16, 3)
    assert core.USAE(DIMS, 16, 3).config() == {"dims": DIMS, "n_concepts": 16, "k": 3}


@pytest.mark.parametrize("seed", ["0", 1.5, -1, True, 2**63])
def test_seeds_outside_the_generator_range_are_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        checks.require_seed(seed)


def test_seeds_at_the_ends_of_the_range_pass():
    checks.require_seed(0)
    checks.require_seed(2**63 - 1)


@pytest.mark.parametrize("device, message", [("tpu", "'tpu' is not a torch device"),
                                             (3.5, "is not a torch device")])
def test_unknown_devices_are_refused(device, message):
    with pytest.raises(ValueError, match=message):
        checks.require_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        checks.require_device("cuda:0")


@pytest.mark.parametrize("options, message", [
    ({"loss": "l2"}, "loss='l2' is not one of"), ({"update": "all"}, "update='all'"),
    ({"schedule": "linear"}, "schedule='linear'"), ({"lr": -1.0}, "lr must be"),
    ({"lr": 0.0}, "lr must be a finite number > 0"), ({"lr": math.nan}, "lr must be"),
    ({"weight_decay": True}, "weight_decay must be a finite number >= 0"),
    ({"warmup_steps": -3}, "warmup_steps"), ({"log_every": 0}, "log_every"),
    ({"progress": 1}, "progress must be True or False")])
def test_bad_training_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        checks.train_config(2, 0, **options)


def test_unknown_options_and_bad_steps_are_refused():
    with pytest.raises(TypeError, match="unknown training options \\['learning_rate'\\]"):
        checks.train_config(2, 0, learning_rate=1e-3)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        checks.train_config(0, 0)
    assert checks.train_config(5, 1, lr=1e-3) == core.TrainConfig(lr=1e-3)


@pytest.mark.parametrize("batch, error, message", [
    ([torch.zeros(3)], TypeError, "batch 7 is a list"),
    ({"a": torch.zeros(4, 6)}, ValueError, r"missing \['b', 'c'\]"),
    ({**tiny_batches(1)[0], "d": torch.zeros(32, 2)}, ValueError, r"unknown \['d'\]"),
    ({name: torch.zeros(1, w) for name, w in DIMS.items()}, ValueError, "fewer than 2 tokens"),
    ({**tiny_batches(1)[0], "b": torch.zeros(31, 8)}, ValueError, "different token counts"),
    ({**tiny_batches(1)[0], "c": torch.full((32, 5), math.inf)}, ValueError,
     "batch 7: NaN or inf activations for model 'c'")])
def test_bad_batches_are_refused_with_their_step(batch, error, message):
    model = core.USAE(DIMS, 16, 3)
    with pytest.raises(error, match=message):
        checks.check_batch(model, batch, 7)
    checks.check_batch(model, tiny_batches(1)[0], 7)  # a good one passes


def test_the_training_entry_point_checks_options_before_any_step():
    model = core.USAE(DIMS, 16, 3, seed=0)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="loss='l2' is not one of"):
        ckpt.train(model, tiny_batches(), 2, progress=False, loss="l2")
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
