"""Tests of usae_monitor: the history rows say what training did."""
import numpy as np
import pytest
import torch

import usae_checkpoint as ckpt
import usae_core as core
import usae_monitor as monitor
from test_core import DIMS, tiny_batches


def test_history_rows_measure_what_training_did():
    model = core.USAE(DIMS, 16, 3, seed=0)
    result = core.train(model, tiny_batches(4, tokens=64), 30, seed=0, lr=1e-2, progress=False,
                        log_every=10, dictionary_init="unit", loss="mse",
                        on_step=monitor.TrainingMonitor())
    first, last = result.history[0], result.history[-1]
    assert [row["step"] for row in result.history] == [10, 20, 30]
    for row in result.history:
        assert set(row["r2"]) <= set(DIMS) and all(set(v) == set(DIMS) for v in row["r2"].values())
        assert all(0 <= v <= 1 for v in row["dead_fraction"].values())
        assert sum(row["steps_by_source"].values()) == 10
        assert row["loss"] == pytest.approx(sum(row["loss_by_target"].values()))
    assert np.mean([v for r in last["r2"].values() for v in r.values()]) > \
        np.mean([v for r in first["r2"].values() for v in r.values()])
    assert all(v < 1 for v in last["dictionary_cosine_to_init"].values())
    assert last["loss"] < first["loss"]


@pytest.mark.parametrize("loss", ["l1_aux", "mse"])
def test_rows_match_a_plain_recomputation_of_the_same_steps(loss):
    outputs = []

    def keep(trainer, output):
        model = trainer.model
        r2 = {name: (1 - (output.recons[name] - target).square().mean()
                     / ((target + model.scalar_frame_offset(name)).var(unbiased=False) + 1e-6)
                     ).item() for name, target in output.targets.items()}
        outputs.append((output.source, output.losses.clone(), trainer.lr("a"), r2))
        watcher(trainer, output)

    watcher = monitor.TrainingMonitor()
    model = core.USAE(DIMS, 16, 3, seed=0)
    # Channel centring makes the released frame differ from the trained one by an offset.
    model.fit_standardization(tiny_batches(1, tokens=64)[0], centre_channels=True)
    result = core.train(model, tiny_batches(4), 7, seed=0, loss=loss, progress=False,
                        log_every=4, on_step=keep)
    assert [row["step"] for row in result.history] == [4, 7]  # and the last step
    for row, chunk in zip(result.history, (outputs[:4], outputs[4:])):
        losses = torch.stack([losses for _, losses, _, _ in chunk]).mean(dim=0)
        assert row["loss_by_target"] == pytest.approx(dict(zip(DIMS, losses.tolist())))
        assert row["steps_by_source"] == {n: sum(s == n for s, *_ in chunk) for n in DIMS}
        assert row["lr"]["a"] == chunk[-1][2]
        for source, targets in row["r2"].items():
            steps = [r2 for s, _, _, r2 in chunk if s == source]
            assert targets == pytest.approx({t: np.mean([r2[t] for r2 in steps]) for t in DIMS},
                                            abs=1e-5)


def test_released_variance_is_the_variance_of_the_offset_batch():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(300, 7, generator=generator) * 3 + 0.5
    offset = torch.randn(7, generator=generator)
    assert monitor.released_variance(target, offset).item() == pytest.approx(
        (target + offset).double().var(unbiased=False).item(), rel=1e-5)


def test_dictionary_cosine_to_init_is_one_at_the_start_and_falls_as_rows_turn():
    model = core.USAE(DIMS, 16, 3, seed=0)
    start = {name: model.dictionary(name).detach().clone() for name in DIMS}
    assert monitor.dictionary_cosine_to_init(model, start) == pytest.approx(dict.fromkeys(DIMS, 1))
    assert monitor.dictionary_cosine_to_init(model, {}) == dict.fromkeys(DIMS)
    with torch.no_grad():
        model.pairs["a"].raw_dictionary.neg_()
    assert monitor.dictionary_cosine_to_init(model, start)["a"] == pytest.approx(-1)


def test_the_training_entry_point_keeps_a_history():
    result = ckpt.train(core.USAE(DIMS, 16, 3, seed=0), tiny_batches(), 6, progress=False,
                        log_every=3)
    assert [row["step"] for row in result.history] == [3, 6]
    assert {"r2", "dead_fraction", "dictionary_cosine_to_init"} <= set(result.history[-1])
