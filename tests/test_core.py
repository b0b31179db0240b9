"""Tests of usae_core: model, losses, schedule, training rule, bad input."""
import math

import numpy as np
import pytest
import torch

import usae_core as core
import usae_synthetic as synthetic

DIMS = {"a": 6, "b": 8, "c": 5}


def tiny_batches(n_batches=4, tokens=32, seed=0, dims=DIMS):
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(tokens, width, generator=generator) * 2 + 0.5
             for name, width in dims.items()} for _ in range(n_batches)]


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def changed_keys(before, model):
    after = model.state_dict()
    return {key for key in before if not torch.equal(before[key], after[key])}


# ----------------------------------------------------------------------------------------------
# Model


def test_topk_keeps_k_non_negative_codes_per_token():
    model = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    acts = tiny_batches(1, tokens=64)[0]
    for name in DIMS:
        encoding = model.encode_full(name, acts[name])
        assert encoding.codes.shape == (64, 16)
        assert (encoding.codes >= 0).all()
        assert ((encoding.codes > 0).sum(dim=1) == 3).all()
        # The kept codes are the k largest ReLU'd pre-codes of each token.
        expected = torch.topk(torch.relu(encoding.pre_codes), 3, dim=1).values.sum(dim=1)
        torch.testing.assert_close(encoding.codes.sum(dim=1), expected)
        assert torch.equal(encoding.codes.gather(1, encoding.indices),
                           torch.relu(encoding.pre_codes).gather(1, encoding.indices))


def test_dictionary_rows_have_unit_norm_before_and_after_training():
    model = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    for name in DIMS:
        torch.testing.assert_close(model.dictionary(name).norm(dim=1), torch.ones(16))
    core.train(model, tiny_batches(), 6, seed=0, lr=0.05, progress=False)
    for name in DIMS:
        assert model.dictionary(name).shape == (16, DIMS[name])
        torch.testing.assert_close(model.dictionary(name).norm(dim=1), torch.ones(16))


def test_encode_from_any_model_decodes_into_every_model():
    model = core.USAE(DIMS, n_concepts=16, k=3, seed=0).eval()
    acts = tiny_batches(1)[0]
    outputs = model("b", acts["b"])
    assert {name: out.shape for name, out in outputs.items()} == {
        name: (32, width) for name, width in DIMS.items()}
    codes = model.encode("b", acts["b"])
    torch.testing.assert_close(model.decode("c", codes),
                               model.unstandardize("c", codes @ model.dictionary("c")))


def test_standardisation_is_one_scalar_mean_and_unbiased_std_per_model():
    model = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    sample = tiny_batches(1, tokens=50)[0]
    stats = model.fit_standardization(sample)
    for name in DIMS:
        values = sample[name].double().numpy()
        assert stats[name][0] == pytest.approx(values.mean(), rel=1e-12)
        assert stats[name][1] == pytest.approx(values.std(ddof=1), rel=1e-12)
        standardized = model.standardize(name, sample[name])
        expected = (values - values.mean()) / (values.std(ddof=1) + 1e-5)
        np.testing.assert_allclose(standardized.numpy(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.unstandardize(name, standardized), sample[name])


def test_training_fits_standardisation_on_the_first_batch_unless_set():
    batches = tiny_batches()
    model = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    core.train(model, batches, 2, seed=0, progress=False)
    reference = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    assert model.standardization() == reference.fit_standardization(batches[0])
    preset = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    preset.set_standardization({name: (1.0, 2.0) for name in DIMS})
    core.train(preset, batches, 2, seed=0, progress=False)
    assert preset.standardization() == {name: (1.0, 2.0) for name in DIMS}


# ----------------------------------------------------------------------------------------------
# Losses against hand computations


def hand_loss(loss, **options):
    """``loss`` of one target: the inputs below, whose values are worked out by hand."""
    target = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    dictionary = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, -0.8]])
    pre_codes = torch.tensor([[2.0, -1.0, 0.5, 0.25], [-0.5, 3.0, 1.0, 2.0]])
    codes = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])  # k = 1
    encoding = core.Encoding(pre_codes, codes, torch.tensor([[0], [1]]))
    return loss({"m": target}, {"m": codes @ dictionary}, encoding, {"m": dictionary},
                **options).item()


def test_l1_aux_loss_equals_hand_computation():
    # recon = [[2, 0], [0, 3]]; residual = [[-1, -2], [0.5, 0]] -> main = 3.5 / 4.
    main = (1 + 2 + 0.5 + 0) / 4
    # Non-selected ReLU'd pre-codes: token 0 [0, 0, 0.5, 0.25], token 1 [0, 0, 1, 2]; the top
    # n // 2 = 2 of them: token 0 -> 0.5 x D2 + 0.25 x D3 = [0.45, 0.2];
    # token 1 -> 1 x D2 + 2 x D3 = [1.8, -0.8].
    aux_recon = [[0.45, 0.2], [1.8, -0.8]]
    residual = [[-1.0, -2.0], [0.5, 0.0]]
    aux = sum(abs(residual[t][i] - aux_recon[t][i]) for t in range(2) for i in range(2)) / 4
    assert hand_loss(core.l1_aux_loss) == pytest.approx(main + 0.1 * aux, rel=1e-6)
    assert hand_loss(core.l1_aux_loss, aux_weight=0.5) == pytest.approx(main + 0.5 * aux,
                                                                         rel=1e-6)


def test_frobenius_and_mse_losses_equal_hand_computation():
    squares = 1 + 4 + 0.25 + 0
    assert hand_loss(core.frobenius_loss) == pytest.approx(math.sqrt(squares))
    assert hand_loss(core.mse_loss) == pytest.approx(squares / 4)


def standardized_batch():
    """A fresh USAE standardised on one tiny batch, and that batch standardised."""
    model = core.USAE(DIMS, n_concepts=16, k=3, seed=0)
    batch = tiny_batches(1)[0]
    model.fit_standardization(batch)
    return model, {name: model.standardize(name, t) for name, t in batch.items()}


def test_training_loss_is_the_sum_over_every_target():
    model, standardized = standardized_batch()
    trainer = core.Trainer(model, core.TrainConfig(loss="mse"), total_steps=10, seed=0)
    with torch.no_grad():
        encoding = model.encode_full("a", standardized["a"], standardized=True)
        expected = [((standardized[n] - encoding.codes @ model.dictionary(n)) ** 2).mean()
                    for n in DIMS]
    losses = trainer.step(standardized, source="a").losses
    torch.testing.assert_close(losses, torch.stack(expected))


# ----------------------------------------------------------------------------------------------
# The update rule


@pytest.mark.parametrize("source", list(DIMS))
def test_a_released_step_changes_only_the_source_encoder_and_decoder(source):
    model, standardized = standardized_batch()
    trainer = core.Trainer(model, core.TrainConfig(), total_steps=10, seed=0)
    model.train()
    before = snapshot(model)
    trainer.step(standardized, source=source)
    changed = changed_keys(before, model)
    expected = {f"pairs.{source}.{key}" for key in (
        "linear.weight", "linear.bias", "batch_norm.weight", "batch_norm.bias",
        "batch_norm.running_mean", "batch_norm.running_var", "batch_norm.num_batches_tracked",
        "raw_dictionary")}
    assert changed == expected
    assert trainer.updates == {name: int(name == source) for name in DIMS}


def test_all_decoders_option_steps_every_decoder_and_one_encoder():
    model, standardized = standardized_batch()
    trainer = core.Trainer(model, core.TrainConfig(update="all_decoders"), total_steps=10, seed=0)
    model.train()
    before = snapshot(model)
    trainer.step(standardized, source="b")
    changed = changed_keys(before, model)
    assert {f"pairs.{name}.raw_dictionary" for name in DIMS} <= changed
    assert not any(key.startswith(("pairs.a.linear", "pairs.a.batch_norm", "pairs.c.linear",
                                   "pairs.c.batch_norm")) for key in changed)
    assert "pairs.b.linear.weight" in changed


def test_released_rule_gives_the_same_encoder_gradient_as_undetached_decoders():
    """Detaching the other decoders changes no gradient that the released code applies."""
    model, x = standardized_batch()

    def encoder_grad(detach):
        model.zero_grad(set_to_none=True)
        encoding = model.encode_full("a", x["a"], standardized=True)
        dictionaries = {name: model.dictionary(name).detach() if detach and name != "a"
                        else model.dictionary(name) for name in DIMS}
        recons = {name: encoding.codes @ d for name, d in dictionaries.items()}
        core.l1_aux_loss(x, recons, encoding, dictionaries).sum().backward()
        return [p.grad.clone() for p in model.pairs["a"].parameters()]

    for released, plain in zip(encoder_grad(True), encoder_grad(False)):
        torch.testing.assert_close(released, plain)


def test_sources_are_drawn_from_the_seeded_generator():
    def drawn(seed):
        trainer = core.Trainer(core.USAE(DIMS, 16, 3, seed=0), core.TrainConfig(), 100, seed)
        return [trainer.draw_source() for _ in range(60)]

    assert drawn(3) == drawn(3)
    assert drawn(3) != drawn(4)
    assert set(drawn(3)) == set(DIMS)


# ----------------------------------------------------------------------------------------------
# Schedules


def test_paper_schedule_values():
    lr = lambda step: core.scheduled_lr(step, total_steps=130, warmup_steps=30,
                                        base_lr=3e-4, final_lr=1e-6)
    assert lr(0) == pytest.approx(1e-6)
    assert lr(15) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert lr(30) == pytest.approx(3e-4)
    assert lr(80) == pytest.approx((3e-4 + 1e-6) / 2)  # half-way through the cosine
    assert lr(130) == pytest.approx(1e-6)
    assert lr(500) == pytest.approx(1e-6)


def lrs_used(schedule, steps, sources):
    model, x = standardized_batch()
    config = core.TrainConfig(schedule=schedule, warmup_steps=2)
    trainer = core.Trainer(model, config, total_steps=steps, seed=0)
    used = []
    for source in sources:
        trainer.step(x, source=source)
        used.append(trainer.optimizers[source].param_groups[0]["lr"])
    return used


def test_paper_schedule_follows_the_global_step():
    used = lrs_used("paper", 6, ["a", "b", "a", "c", "b", "a"])
    expected = [core.scheduled_lr(step, 6, 2, 3e-4, 1e-6) for step in range(6)]
    assert used == pytest.approx(expected)


def test_released_schedule_advances_only_when_its_model_steps():
    used = lrs_used("released", 6, ["a", "b", "a", "c", "b", "a"])
    lr = lambda count: core.scheduled_lr(count, 6, 2, 3e-4, 1e-6)
    # Each model's first update runs at the initial lr; then its own counter drives the schedule.
    assert used == pytest.approx([3e-4, 3e-4, lr(1), 3e-4, lr(1), lr(2)])


def test_default_warmup_is_one_thirtieth_of_the_run():
    trainer = core.Trainer(core.USAE(DIMS, 16, 3), core.TrainConfig(), total_steps=300, seed=0)
    assert trainer.warmup_steps == 10


# ----------------------------------------------------------------------------------------------
# Checkpoints


# ----------------------------------------------------------------------------------------------
# Bad input: every error says what is wrong and what to do


def test_wrong_width_and_unknown_model_are_refused():
    model = core.USAE(DIMS, 16, 3)
    with pytest.raises(ValueError, match=r"'a' takes activations of shape \(tokens, 6\)"):
        model.encode("a", torch.randn(4, 7))
    with pytest.raises(KeyError, match=r"unknown model 'z'.*\['a', 'b', 'c'\]"):
        model.encode("z", torch.randn(4, 6))
    with pytest.raises(AssertionError, match="codes must be"):  # an invariant, not input
        model.decode("a", torch.randn(4, 15))


def test_impossible_sizes_are_invariants_of_the_core():
    # Settings are checked where they enter (usae_checks, tests/test_checks.py); the core asserts.
    for dims, n, k in (({}, 16, 3), ({"a-b": 3}, 16, 3), (DIMS, 16, 16), (DIMS, 16, 0)):
        with pytest.raises(AssertionError):
            core.USAE(dims, n, k)


def test_running_out_of_batches_is_an_error_for_one_shot_iterators():
    with pytest.raises(ValueError, match="batches ran out after step 4"):
        core.train(core.USAE(DIMS, 16, 3), iter(tiny_batches(4)), 6, progress=False)
    result = core.train(core.USAE(DIMS, 16, 3), tiny_batches(4), 6, progress=False)
    assert result.step == 6  # a list is iterated again for a second epoch


# ----------------------------------------------------------------------------------------------
# Planted concepts: the USAE must find what was put there


def test_usae_recovers_planted_concepts_and_reconstructs_every_model(planted_run):
    model, train_data, held_out = planted_run
    with torch.no_grad():
        for source in held_out:
            codes = model.encode(source, held_out[source])
            for target in held_out:
                residual = held_out[target] - model.decode(target, codes)
                centred = held_out[target] - held_out[target].mean(dim=0)
                r2 = 1 - residual.square().sum() / centred.square().sum()
                assert r2 >= 0.9, (source, target, r2.item())
        for name in held_out:
            recovered = synthetic.best_cosine(train_data.views[name], model.dictionary(name))
            assert recovered.mean() >= 0.9, (name, recovered.mean().item())


# ----------------------------------------------------------------------------------------------
# Initialisation, channel centring, training history


def test_dictionary_inits_and_transposed_encoders():
    batch = {name: torch.randn(40, width) for name, width in DIMS.items()}
    randn, unit, tokens = (core.USAE(DIMS, 16, 3, seed=0) for _ in range(3))
    for model, init in ((randn, "randn"), (unit, "unit"), (tokens, "tokens")):
        trainer = core.Trainer(model, core.TrainConfig(dictionary_init=init,
                                                       encoder_init="transpose"), 10, 0)
        trainer.initialise(batch)
        for name in DIMS:
            torch.testing.assert_close(model.pairs[name].linear.weight, model.dictionary(name))
            assert not model.pairs[name].linear.bias.any()
            assert torch.equal(trainer.initial_dictionaries[name], model.dictionary(name))
    for name in DIMS:  # unit rows: the same directions, norm 1 instead of about sqrt(d)
        torch.testing.assert_close(unit.dictionary(name), randn.dictionary(name))
        torch.testing.assert_close(unit.pairs[name].raw_dictionary.norm(dim=1), torch.ones(16))
        assert randn.pairs[name].raw_dictionary.norm(dim=1).mean() > 1.5
    # tokens: concept c of every model starts at that model's token at one shared row
    directions = batch["a"] / batch["a"].norm(dim=1, keepdim=True)
    rows = (tokens.dictionary("a") @ directions.T).argmax(dim=1)  # cosine 1 at the drawn row
    for name in DIMS:
        expected = batch[name][rows]
        torch.testing.assert_close(tokens.dictionary(name),
                                   expected / expected.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="at least n_concepts tokens"):
        core.Trainer(core.USAE(DIMS, 64, 3), core.TrainConfig(dictionary_init="tokens"), 1,
                     0).initialise(batch)


def test_unit_rows_move_further_than_released_randn_rows_in_the_same_steps():
    # Adam moves every raw entry by about lr per step: rows of norm sqrt(d) turn sqrt(d) x slower
    wide, moved = {"a": 64, "b": 48}, {}
    for init in ("randn", "unit"):
        model = core.USAE(wide, 16, 3, seed=0)
        start = {name: model.dictionary(name).detach().clone() for name in wide}  # same for both
        core.train(model, tiny_batches(4, 64, dims=wide), 40, seed=0, lr=1e-2, progress=False,
                   dictionary_init=init)
        moved[init] = 1 - np.median([(model.dictionary(n).detach() * start[n]).sum(dim=1)
                                     .median().item() for n in wide])
    assert moved["unit"] > 5 * moved["randn"] > 0, moved


def test_channel_centring_round_trips_and_keeps_the_scalar_frame():
    generator = torch.Generator().manual_seed(0)
    offsets = torch.linspace(-3, 5, DIMS["a"])
    sample = {name: torch.randn(500, width, generator=generator) * 2 + (offsets if name == "a"
                                                                        else 1.0)
              for name, width in DIMS.items()}
    plain, centred = core.USAE(DIMS, 16, 3), core.USAE(DIMS, 16, 3)
    assert plain.fit_standardization(sample) == \
        centred.fit_standardization(sample, centre_channels=True)  # same scalars
    assert all(centred.pairs[n].channel_offset.any() for n in DIMS)
    assert not any(plain.pairs[n].channel_offset.any() for n in DIMS)
    for name in DIMS:
        inside = centred.standardize(name, sample[name])
        torch.testing.assert_close(inside.mean(dim=0), torch.zeros(DIMS[name]), atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(centred.unstandardize(name, inside), sample[name])
        torch.testing.assert_close(inside + centred.scalar_frame_offset(name),
                                   plain.standardize(name, sample[name]))
        assert not plain.scalar_frame_offset(name).any()
    with pytest.raises(AssertionError, match="'a'.*channel means"):
        centred.set_standardization(centred.standardization(), {n: torch.zeros(2) for n in DIMS})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_encode_refuses_non_finite_activations_before_batchnorm_sees_them(bad):
    model = core.USAE(DIMS, 16, 3, seed=0).train()
    acts = torch.randn(8, 6)
    acts[2, 1] = bad
    before = {k: v.clone() for k, v in model.pairs["a"].batch_norm.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf activations for model 'a'"):
        model.encode("a", acts)
    after = model.pairs["a"].batch_norm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert torch.isfinite(model.eval().encode("a", torch.randn(4, 6))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_finite_check_is_exact_when_the_sum_overflows(dtype):
    model = core.USAE(DIMS, 16, 3, seed=0)
    huge = torch.full((8, 6), torch.finfo(dtype).max / 2, dtype=dtype)  # finite; sums to inf
    model.check_acts("a", huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        planted = huge.clone()
        planted[5, 4] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            model.check_acts("a", planted)
