"""The fast training step against a plain re-implementation of the released training loop.

``reference_step`` is one step of the released loop written out plainly (spec section 4.2;
``universal_sae/train.py`` L223-302): fp32; every decoder's gradient computed and thrown away (no
detach); TopK and the auxiliary top n // 2 sorted (``torch.topk``'s default, as overcomplete
calls it); the auxiliary term selected and decoded densely once per target; the loss and every
target's R^2 read back to the host at every step, as its logging does; one non-fused AdamW per
model; ``clip_grad_norm_`` on every SAE; only optimizer i zeroed and stepped.
``benchmarks/train_throughput.py`` imports it from here, so the benchmark times the loop that
these tests prove equal to :meth:`usae_core.Trainer.step`.
"""
from __future__ import annotations

from typing import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import usae_checks as checks
import usae_core as core
import usae_checkpoint as ckpt

DIMS = {"a": 24, "b": 40, "c": 32}


def reference_optimizers(model: core.USAE, lr: float = 3e-4,
                         weight_decay: float = 1e-5) -> dict[str, torch.optim.Optimizer]:
    """The released per-model AdamW (the plain for-loop implementation)."""
    return {name: torch.optim.AdamW(model.pairs[name].parameters(), lr=lr,
                                    weight_decay=weight_decay, foreach=False, fused=False)
            for name in model.names}


def released_l1_aux(target: Tensor, pre_codes: Tensor, codes: Tensor, dictionary: Tensor,
                    aux_weight: float = 0.1) -> Tensor:
    """The released criterion of one target, as written there: the top n // 2 of the
    non-selected ReLU'd pre-codes decode the (undetached) residual."""
    residual = target - codes @ dictionary
    leftover = F.relu(pre_codes) - codes
    aux_values, aux_indices = torch.topk(leftover, leftover.shape[-1] // 2, dim=-1)
    aux_codes = torch.zeros_like(leftover).scatter(-1, aux_indices, aux_values)
    return residual.abs().mean() + aux_weight * (residual - aux_codes @ dictionary).abs().mean()


def reference_step(model: core.USAE, optimizers: Mapping[str, torch.optim.Optimizer],
                   batch: Mapping[str, Tensor], source: str, lr: float, *,
                   aux_weight: float = 0.1, grad_clip: float = 1.0,
                   update: str = "released") -> tuple[Tensor, float, dict[str, float]]:
    """One step of the released loop on a standardised batch.

    Returns the per-target losses (M,), the summed loss and each target's R^2 read back to the
    host. ``update="all_decoders"`` zeroes and steps every optimizer (this project's variant).
    """
    names = model.names
    stepped = names if update == "all_decoders" else [source]
    for name in stepped:
        optimizers[name].zero_grad()
    pair = model.pairs[source]
    pre = pair.batch_norm(pair.linear(batch[source]))
    values, indices = torch.topk(F.relu(pre), model.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    terms, r2 = [], {}
    for name in names:
        raw = model.pairs[name].raw_dictionary
        dictionary = raw / (raw.norm(dim=1, keepdim=True) + 1e-8)
        terms.append(released_l1_aux(batch[name], pre, z, dictionary, aux_weight))
        residual = batch[name] - z @ dictionary
        centred = batch[name] - batch[name].mean(dim=0)
        r2[name] = (1 - residual.detach().square().sum() / centred.square().sum()).item()
    loss = sum(terms)
    loss.backward()
    for name in names:
        nn.utils.clip_grad_norm_(model.pairs[name].parameters(), grad_clip)
    for name in stepped:
        for group in optimizers[name].param_groups:
            group["lr"] = lr
        optimizers[name].step()
    return torch.stack(terms).detach(), loss.item(), r2


# ----------------------------------------------------------------------------------------------


def standardized_batches(n_batches: int, tokens: int = 256, dims=DIMS, seed: int = 0):
    """Token-aligned activations: shared low-rank signal seen through per-model projections."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        shared = torch.randn(tokens, 16, generator=generator)
        batch = {name: shared @ torch.randn(16, width, generator=generator) / 4
                 + 0.5 * torch.randn(tokens, width, generator=generator)
                 for name, width in dims.items()}
        batches.append({name: (t - t.mean()) / t.std() for name, t in batch.items()})
    return batches


def run_both(steps: int, n: int = 128, k: int = 8, lr: float = 3e-3, update: str = "released",
             **options):
    """The trainer and the reference from the same weights on the same sources and batches."""
    batches = standardized_batches(steps)
    fast = core.USAE(DIMS, n, k, seed=0).train()
    plain = core.USAE(DIMS, n, k, seed=0).train()
    config = core.TrainConfig(lr=lr, warmup_steps=2, update=update, **options)
    trainer = core.Trainer(fast, config, total_steps=steps, seed=0)
    optimizers = reference_optimizers(plain, lr, config.weight_decay)
    sources = [trainer.draw_source() for _ in range(steps)]
    fast_losses, plain_losses = [], []
    for step, (batch, source) in enumerate(zip(batches, sources)):
        lr_now = core.scheduled_lr(step, steps, 2, lr, config.final_lr)
        plain_losses.append(reference_step(plain, optimizers, batch, source, lr_now,
                                           update=update)[0])
        fast_losses.append(trainer.step(batch, source).losses)
    return fast, plain, torch.stack(fast_losses), torch.stack(plain_losses), sources


# Tolerances. The losses agree to float rounding at every step. The weights agree to rounding
# except where Adam amplifies it: an element whose gradient is near zero moves by about
# lr * g / (|g| + eps), so a rounding-sized change of g can move it by up to about lr. This hits
# the odd element by chance (at most 1 in 1000 is allowed), and every element of the encoder's
# Linear bias: BatchNorm subtracts it again, so its exact gradient is zero and both loops move
# it by rounding noise alone (BatchNorm's running mean follows it). Neither changes a train-mode
# output. Every element stays within lr per step.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-6)


def assert_same_weights(fast: core.USAE, plain: core.USAE, steps: int, lr: float) -> None:
    plain_state = plain.state_dict()
    for key, value in fast.state_dict().items():
        expected = plain_state[key]
        if not value.is_floating_point():
            assert torch.equal(value, expected), key
            continue
        assert (value - expected).abs().max() <= steps * lr, key
        if not key.endswith(("linear.bias", "running_mean")):
            far = ~torch.isclose(value, expected, **WEIGHT_TOL)
            assert far.sum() <= far.numel() / 1000, (key, far.sum().item())


@pytest.mark.parametrize("sparse_decode", [False, True])
def test_trainer_equals_the_released_loop(sparse_decode):
    steps, lr = 9, 3e-3
    fast, plain, fast_losses, plain_losses, sources = run_both(steps, lr=lr,
                                                               sparse_decode=sparse_decode)
    assert set(sources) == set(DIMS)
    torch.testing.assert_close(fast_losses, plain_losses, **LOSS_TOL)
    assert_same_weights(fast, plain, steps, lr)
    assert not torch.equal(fast.pairs["a"].raw_dictionary,
                           core.USAE(DIMS, 128, 8, seed=0).pairs["a"].raw_dictionary)


def test_all_decoders_variant_equals_the_plain_loop():
    steps, lr = 6, 3e-3
    fast, plain, fast_losses, plain_losses, _ = run_both(steps, lr=lr, update="all_decoders")
    torch.testing.assert_close(fast_losses, plain_losses, **LOSS_TOL)
    assert_same_weights(fast, plain, steps, lr)


@pytest.mark.parametrize("n, k", [(128, 8), (16, 12), (17, 8)])
@pytest.mark.parametrize("sparse_decode", [False, True])
@pytest.mark.parametrize("update", ["released", "all_decoders"])
def test_step_losses_equal_the_released_l1_aux_per_target(n, k, sparse_decode, update):
    """Including k + n // 2 >= n, where every non-selected concept enters the auxiliary term."""
    batch = standardized_batches(1, tokens=64)[0]
    model = core.USAE(DIMS, n, k, seed=1).train()
    with torch.no_grad():
        encoding = model.encode_full("b", batch["b"], standardized=True)
        expected = torch.stack([
            released_l1_aux(batch[name], encoding.pre_codes, encoding.codes,
                            model.dictionary(name)) for name in DIMS])
    model.pairs["b"].batch_norm.reset_running_stats()  # encode_full above counted as a batch
    config = core.TrainConfig(update=update, sparse_decode=sparse_decode)
    losses = core.Trainer(model, config, total_steps=5, seed=0).step(batch, source="b").losses
    torch.testing.assert_close(losses, expected, **LOSS_TOL)


@pytest.mark.parametrize("loss", list(core.LOSSES))
def test_sparse_decode_equals_dense_decode_for_every_loss(loss):
    steps, lr = 4, 3e-3
    models, losses = [], []
    for sparse_decode in (False, True):
        model = core.USAE(DIMS, 64, 6, seed=2).train()
        config = core.TrainConfig(loss=loss, lr=lr, sparse_decode=sparse_decode)
        trainer = core.Trainer(model, config, total_steps=steps, seed=0)
        losses.append(torch.stack([trainer.step(batch, source).losses for batch, source in
                                   zip(standardized_batches(steps), ["a", "c", "a", "b"])]))
        models.append(model)
    torch.testing.assert_close(losses[1], losses[0], **LOSS_TOL)
    assert_same_weights(models[1], models[0], steps, lr)


@pytest.mark.parametrize("loss", ["l1_aux", "mse"])
def test_bf16_precision_stays_close_to_fp32_and_keeps_fp32_state(loss):
    batch = standardized_batches(1)[0]
    losses = {}
    for precision in ("fp32", "bf16"):
        model = core.USAE(DIMS, 128, 8, seed=0).train()
        trainer = core.Trainer(model, core.TrainConfig(loss=loss, precision=precision), 5, 0)
        losses[precision] = trainer.step(batch, source="c").losses
        assert losses[precision].dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.pairs["c"].batch_norm.running_var.dtype == torch.float32
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=2e-2, atol=0)


def test_precision_is_a_math_field_and_sparse_decode_is_not(tmp_path):
    path = tmp_path / "run.safetensors"
    batches = standardized_batches(2, tokens=32)
    common = dict(progress=False, checkpoint_path=str(path))
    with pytest.raises(ValueError, match="ran out after step 2"):  # leaves a checkpoint at 2
        ckpt.train(core.USAE(DIMS, 32, 4, seed=0), iter(batches), 4, **common)
    assert "precision" in core.TrainConfig.MATH_FIELDS
    assert "sparse_decode" not in core.TrainConfig.MATH_FIELDS
    with pytest.raises(ckpt.CheckpointError, match="'precision': \\('fp32', 'bf16'\\)"):
        ckpt.train(core.USAE(DIMS, 32, 4), batches, 4, precision="bf16", **common)
    result = ckpt.train(core.USAE(DIMS, 32, 4), batches, 4, sparse_decode=True, **common)
    assert result.step == 4


def test_checkpoints_written_before_the_new_options_still_resume(tmp_path):
    from safetensors.torch import load_file, save_file
    import json

    path = tmp_path / "old.safetensors"
    batches = standardized_batches(2, tokens=32)
    with pytest.raises(ValueError, match="ran out after step 2"):  # leaves a checkpoint at 2
        ckpt.train(core.USAE(DIMS, 32, 4, seed=0), iter(batches), 4, progress=False,
                   checkpoint_path=str(path))
    header = ckpt.read_header(path)
    del header["sha256"]  # those checkpoints predate checksums too
    for key in ("precision", "sparse_decode"):
        del header["training"]["config"][key]
    for groups in header["training"]["param_groups"].values():
        for group in groups:
            group["fused"] = None  # written by the earlier, non-fused optimizer
    save_file(load_file(path), path, metadata={"usae": json.dumps(header)})
    model = core.USAE(DIMS, 32, 4)
    result = ckpt.train(model, batches, 4, progress=False, checkpoint_path=str(path))
    assert result.step == 4
    written = ckpt.read_header(path)["training"]
    assert written["config"]["precision"] == "fp32"
    assert all(g["fused"] for groups in written["param_groups"].values() for g in groups)


@pytest.mark.parametrize("options, message", [
    ({"precision": "fp16"}, "precision='fp16' is not one of"),
    ({"sparse_decode": 1}, "sparse_decode must be True, False or None")])
def test_bad_speed_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        checks.check_train_config(core.TrainConfig(**options))


def test_sparse_decode_by_default_on_a_cpu_only():
    """None (the default) decodes sparsely on a CPU, where it is faster (benchmarks/
    train_throughput.py --entry); an explicit choice is kept."""
    model = core.USAE(DIMS, 32, 4)
    assert core.TrainConfig().sparse_decode is None
    assert core.Trainer(model, core.TrainConfig(), 4, 0).sparse_decode is True
    assert core.Trainer(model, core.TrainConfig(sparse_decode=False), 4, 0).sparse_decode is False
