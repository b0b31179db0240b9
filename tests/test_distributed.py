"""Tests of usae_distributed: two gloo processes on CPU compute what one process computes.

The two-process tests start this file as a script twice, with the environment torchrun would set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); each rank runs every case once
(:func:`worker`) and saves what it saw, which the tests compare with one-process runs.
"""
import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import usae_checkpoint as ckpt
import usae_core as core
import usae_distributed as ud
from conftest import run_ranks
from test_core import DIMS, tiny_batches

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORLD, N_CONCEPTS, K, STEPS, SEED = 2, 16, 3, 8, 3
OPTIONS = {"lr": 0.01, "progress": False}
RUNS = {"released": {"update": "released"},
        # The global first batch must also feed the standardisation and the token init.
        "all_decoders": {"update": "all_decoders", "dictionary_init": "tokens",
                         "encoder_init": "transpose"}}


# The encoders' Linear bias feeds a train-mode BatchNorm, which subtracts it again: its gradient
# is zero up to rounding (~1e-8), and AdamW scales that noise into steps of about lr in random
# directions. One process does not reproduce it either (1 and 2 CPU threads end ~1e-2 apart), so
# the exact comparison freezes it; the run as it is matches in everything else.
NOISE = ("linear.bias", "batch_norm.running_mean")  # the bias, and the running mean it enters


def build_model(seed=0, frozen_bias=False):
    model = core.USAE(DIMS, N_CONCEPTS, K, seed=seed)
    for pair in model.pairs.values():
        pair.linear.bias.requires_grad_(not frozen_bias)
    return model


def global_batches(seed=0):
    """4 global batches of 64 tokens (32 per rank): 8 steps are two epochs."""
    return tiny_batches(n_batches=4, tokens=64, seed=seed)


# ---- what each rank runs ---------------------------------------------------------------------


MOMENTA = (0.1, None)  # None: BatchNorm's cumulative average


def batch_norm_setup(momentum, cls=nn.BatchNorm1d):
    """A global batch (64 tokens, 5 channels, a large mean), the weights of a loss on it, and a
    BatchNorm of random affine parameters."""
    generator = torch.Generator().manual_seed(MOMENTA.index(momentum))
    acts = torch.randn(64, 5, generator=generator) * 3 + 2
    weights = torch.randn(64, 5, generator=generator)
    batch_norm = cls(5, momentum=momentum)
    with torch.no_grad():
        batch_norm.weight.copy_(torch.randn(5, generator=generator))
        batch_norm.bias.copy_(torch.randn(5, generator=generator))
    return acts, weights, batch_norm


def batch_norm_case(ctx):
    """Two train-mode forwards and a backward through GlobalBatchNorm1d on this rank's slice,
    then an eval-mode forward."""
    results = {}
    for momentum in MOMENTA:
        acts, weights, batch_norm = batch_norm_setup(momentum, ud.GlobalBatchNorm1d)
        mine = ud.local_slice({"x": acts, "w": weights}, ctx.rank, ctx.world_size)
        x = mine["x"].clone().requires_grad_()
        first, second = batch_norm(x), batch_norm(2 * x)
        ((first * mine["w"]).sum() + second.square().sum()).backward()
        for parameter in batch_norm.parameters():  # the global loss is the sum of the ranks'
            torch.distributed.all_reduce(parameter.grad)
        results[f"momentum={momentum}"] = {
            "first": first.detach(), "second": second.detach(), "x_grad": x.grad,
            "weight_grad": batch_norm.weight.grad, "bias_grad": batch_norm.bias.grad,
            "state": batch_norm.state_dict(), "eval": batch_norm.eval()(mine["x"]).detach()}
    return results


def refusal(run):
    try:
        run()
    except ValueError as error:
        return str(error)
    return None


def refusal_cases(ctx):
    """Each case must stop every rank with the same clear message (none may hang)."""
    def model(seed=0):
        return core.USAE(DIMS, N_CONCEPTS, K, seed=seed)

    def train(usae, batches, seed=SEED, **options):
        return ud.train(usae, batches, 2, seed, **OPTIONS, **options)

    odd = global_batches()[:2]
    odd[1] = {name: acts[:63] for name, acts in odd[1].items()}  # step 1 cannot be split
    return {
        "frobenius": refusal(lambda: train(model(), global_batches(), loss="frobenius")),
        "indivisible": refusal(lambda: train(model(), odd)),
        "seed": refusal(lambda: train(model(), global_batches(), seed=ctx.rank)),
        "weights": refusal(lambda: train(model(seed=ctx.rank), global_batches())),
        "data": refusal(lambda: train(model(), global_batches(seed=ctx.rank)))}


class Interrupted(RuntimeError):
    pass


def stopping_after(batches, count):
    """The global batches, for two epochs, stopping the run after ``count`` of them."""
    for index, batch in enumerate(itertools.chain(batches, batches)):
        if index == count:
            raise Interrupted
        yield batch


def checkpoint_case(out):
    """A checkpointed run stopped after 5 steps (its checkpoint at step 4, by rank 0), then
    resumed on both ranks from that shared file to the end."""
    path, options = Path(out) / "usae.safetensors", {**OPTIONS, "checkpoint_every": 2}
    try:
        ud.train(build_model(frozen_bias=True), stopping_after(global_batches(), 5), STEPS,
                 SEED, checkpoint_path=path, **options)
    except Interrupted:
        pass
    stopped_at = ckpt.read_header(path)["training"]["step"]
    model = build_model(frozen_bias=True)
    ud.train(model, global_batches(), STEPS, SEED, checkpoint_path=path, **options)
    return {"stopped_at": stopped_at, "state": model.state_dict()}


def worker(out):
    ctx = ud.init()
    assert ctx.world_size == WORLD and ctx.device == "cpu", ctx
    results = {"batch_norm": batch_norm_case(ctx)}
    for (name, options), frozen_bias in itertools.product(RUNS.items(), (True, False)):
        model, losses = build_model(frozen_bias=frozen_bias), []
        ud.train(model, global_batches(), STEPS, SEED, **OPTIONS, **options,
                 on_step=lambda trainer, output: losses.append(output.losses))
        results[name, frozen_bias] = {"state": model.state_dict(), "losses": torch.stack(losses)}
    if ctx.rank == 0:  # an eval-mode backward on one rank alone must not wait for the other
        model.encode("a", global_batches()[0]["a"]).sum().backward()
    results["refusals"] = refusal_cases(ctx)
    results["checkpointed"] = checkpoint_case(out)
    torch.save(results, Path(out) / f"rank{ctx.rank}.pt")
    ud.close()


# ---- the two-process run, once for the module ------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What ranks 0 and 1 saved (the worker's ``results``)."""
    out = tmp_path_factory.mktemp("distributed")
    run_ranks([__file__, str(out)], out, WORLD)
    return [{**torch.load(out / f"rank{r}.pt", weights_only=True), "folder": out}
            for r in range(WORLD)]


def one_process_run(frozen_bias=False, **options):
    model, losses = build_model(frozen_bias=frozen_bias), []
    core.train(model, global_batches(), STEPS, SEED, **OPTIONS, **options,
               on_step=lambda trainer, output: losses.append(output.losses))
    return model, torch.stack(losses)


@pytest.mark.parametrize("frozen_bias", [True, False], ids=["frozen_bias", "as_is"])
@pytest.mark.parametrize("run", list(RUNS))
def test_two_ranks_train_as_one_process(ranks, run, frozen_bias):
    model, losses = one_process_run(frozen_bias, **RUNS[run])
    expected = model.state_dict()
    states = [rank[run, frozen_bias]["state"] for rank in ranks]
    # The ranks are one model: bit for bit the same weights, BatchNorm statistics included.
    assert states[0].keys() == states[1].keys() == expected.keys()
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    torch.testing.assert_close(ranks[0][run, frozen_bias]["losses"], losses, rtol=1e-5,
                               atol=1e-5)
    compared = [key for key in expected if frozen_bias or not key.endswith(NOISE)]
    for key in compared:
        torch.testing.assert_close(states[0][key], expected[key], rtol=1e-5, atol=1e-5, msg=key)
    # Training moved what it steps, so the comparison is not of untouched initial weights.
    untrained = build_model().state_dict()
    for name in DIMS:
        for key in ("raw_dictionary", "linear.weight", "batch_norm.running_var"):
            key = f"pairs.{name}.{key}"
            assert not torch.allclose(expected[key], untrained[key]), key


def test_a_stopped_run_resumes_on_every_rank_from_rank_0s_checkpoint(ranks):
    """Stopped after step 5 with checkpoints every 2 steps, then resumed: the ranks end where
    an uninterrupted one-process run ends, and the checkpoint rank 0 wrote holds that model."""
    expected = one_process_run(frozen_bias=True, **RUNS["released"])[0].state_dict()
    seen = [rank["checkpointed"] for rank in ranks]
    assert [case["stopped_at"] for case in seen] == [4, 4]
    for key, value in expected.items():
        assert torch.equal(seen[0]["state"][key], seen[1]["state"][key]), key
        torch.testing.assert_close(seen[0]["state"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    path = ranks[0]["folder"] / "usae.safetensors"
    written = ckpt.load(path).state_dict()
    assert all(torch.equal(written[key], value) for key, value in seen[0]["state"].items())
    assert ckpt.read_header(path)["training"]["step"] == STEPS
    assert sorted(p.name for p in path.parent.iterdir() if "usae" in p.name) == \
        [path.name]  # no lock and no temporary left behind


@pytest.mark.parametrize("momentum", MOMENTA)
def test_global_batch_norm_equals_batchnorm1d_on_the_whole_batch(ranks, momentum):
    acts, weights, batch_norm = batch_norm_setup(momentum)
    x = acts.clone().requires_grad_()
    first, second = batch_norm(x), batch_norm(2 * x)
    ((first * weights).sum() + second.square().sum()).backward()
    seen = [rank["batch_norm"][f"momentum={momentum}"] for rank in ranks]
    both = {key: torch.cat([seen[0][key], seen[1][key]]) for key in ("first", "second",
                                                                      "x_grad", "eval")}
    tolerance = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(both["first"], first, **tolerance)
    torch.testing.assert_close(both["second"], second, **tolerance)
    torch.testing.assert_close(both["x_grad"], x.grad, **tolerance)
    for rank in seen:
        torch.testing.assert_close(rank["weight_grad"], batch_norm.weight.grad, **tolerance)
        torch.testing.assert_close(rank["bias_grad"], batch_norm.bias.grad, **tolerance)
        assert rank["state"].keys() == batch_norm.state_dict().keys()
        for key, value in batch_norm.state_dict().items():  # running stats, 2 batches tracked
            torch.testing.assert_close(rank["state"][key], value, **tolerance, msg=key)
    torch.testing.assert_close(both["eval"], batch_norm.eval()(acts), **tolerance)


def test_every_rank_refuses_with_a_clear_message(ranks):
    messages = [rank["refusals"] for rank in ranks]
    assert messages[0] == messages[1]  # the same refusal on both ranks, at the same step
    refused = messages[0]
    assert "loss='frobenius'" in refused["frobenius"] and "'mse'" in refused["frobenius"]
    assert "global batch 1 has 63 tokens" in refused["indivisible"]
    assert "divisible by the number of processes" in refused["indivisible"]
    differ = "the ranks differ in "
    assert refused["seed"].startswith(differ + "seed, steps or options:")
    assert refused["weights"].startswith(differ + "model weights or standardisation:")
    # Different data also fits different standardisations.
    assert refused["data"].startswith(differ + "model weights or standardisation, the first "
                                      "global batch:")
    assert "iterate the same global batches" in refused["data"]


# ---- one process, no process group -----------------------------------------------------------


def test_without_a_process_group_global_batch_norm_is_batchnorm1d():
    reference = nn.BatchNorm1d(5)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2)
    converted = ud.GlobalBatchNorm1d.convert(reference)
    assert converted.weight is reference.weight and converted.running_var is \
        reference.running_var  # shared: an optimizer built before still steps it
    assert converted.state_dict().keys() == nn.BatchNorm1d(5).state_dict().keys()
    twin = nn.BatchNorm1d(5)
    twin.load_state_dict(reference.state_dict())
    acts = torch.randn(32, 5) * 2 + 1
    for mode in ("train", "eval"):
        getattr(converted, mode)(), getattr(twin, mode)()
        assert torch.equal(converted(acts), twin(acts)), mode
    assert torch.equal(converted.running_mean, twin.running_mean)


def test_make_data_parallel_is_idempotent_and_keeps_the_parameters():
    model = core.USAE(DIMS, N_CONCEPTS, K, seed=0)
    parameters, keys = list(model.parameters()), model.state_dict().keys()
    ud.make_data_parallel(model)
    modules = [pair.batch_norm for pair in model.pairs.values()]
    hooks = [len(p._post_accumulate_grad_hooks or ()) for p in model.parameters()]
    assert all(isinstance(m, ud.GlobalBatchNorm1d) for m in modules) and hooks == [1] * len(hooks)
    ud.make_data_parallel(model)
    assert [pair.batch_norm for pair in model.pairs.values()] == modules
    assert [len(p._post_accumulate_grad_hooks or ()) for p in model.parameters()] == hooks
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert model.state_dict().keys() == keys


@pytest.mark.parametrize("run", list(RUNS))
def test_in_one_process_train_is_the_core_loop(run):
    model, losses = one_process_run(**RUNS[run])
    mine, seen = core.USAE(DIMS, N_CONCEPTS, K, seed=0), []
    ud.train(mine, global_batches(), STEPS, SEED, **OPTIONS, **RUNS[run],
             on_step=lambda trainer, output: seen.append(output.losses))
    assert torch.equal(torch.stack(seen), losses)
    for key, value in model.state_dict().items():
        assert torch.equal(mine.state_dict()[key], value), key


def test_local_slices_are_contiguous_and_refused_when_unequal():
    batch = {"a": torch.arange(12.0).reshape(6, 2), "b": torch.arange(6.0).reshape(6, 1)}
    slices = [ud.local_slice(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([s["a"] for s in slices]), batch["a"])
    assert torch.equal(slices[1]["b"], torch.tensor([[2.0], [3.0]]))
    with pytest.raises(ValueError, match="6 tokens, which 4 ranks cannot split"):
        ud.local_slice(batch, 0, 4)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        ud.local_slice(batch, 3, 3)
    with pytest.raises(ValueError, match="same token count"):
        ud.local_slice({"a": batch["a"], "b": batch["b"][:4]}, 0, 2)


def test_bad_arguments_are_refused(monkeypatch):
    model = core.USAE(DIMS, N_CONCEPTS, K, seed=0)
    trainer = core.Trainer(model, core.TrainConfig(progress=False), STEPS, SEED)
    with pytest.raises(ValueError, match="options or a trainer, not both"):
        ud.train(model, global_batches(), STEPS, trainer=trainer, lr=0.1)
    with pytest.raises(ValueError, match="loss must be|'loss'|loss="):
        ud.train(model, global_batches(), STEPS, loss="l2")
    with pytest.raises(TypeError, match="usae_core.USAE"):
        ud.make_data_parallel(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        ud.init("mpi")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ud.init()[:3] == (0, 1, 0) and (ud.rank(), ud.world_size()) == (0, 1)
    ud.close()  # nothing to leave: no error


if __name__ == "__main__":  # one rank of the two-process run (see the ``ranks`` fixture)
    worker(sys.argv[1])
