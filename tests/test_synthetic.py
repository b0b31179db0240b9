"""Tests of usae_synthetic: the planted ground truth is what it says it is."""
import pytest
import torch

import usae_synthetic as synthetic

DIMS = {"a": 12, "b": 20, "c": 16}


def test_activations_are_the_codes_through_each_models_views():
    membership = torch.ones(10, 3, dtype=torch.bool)
    membership[0, 1] = False  # concept 0 is invisible to model b
    data = synthetic.planted_concepts(DIMS, 10, 3, 50, seed=1, membership=membership)
    assert ((data.codes > 0).sum(dim=1) == 3).all()
    assert data.codes.min() >= 0 and data.codes[data.codes > 0].min() >= 0.5
    for column, (name, width) in enumerate(DIMS.items()):
        assert data.acts[name].shape == (50, width)
        torch.testing.assert_close(data.views[name].norm(dim=1), torch.ones(10))
        seen = data.codes * membership[:, column].float()
        torch.testing.assert_close(data.acts[name], seen @ data.views[name])


def test_seeds_fix_the_views_and_token_seed_draws_new_tokens_of_the_same_concepts():
    first = synthetic.planted_concepts(DIMS, 10, 2, 40, seed=3)
    held_out = synthetic.planted_concepts(DIMS, 10, 2, 40, seed=3, token_seed=4)
    assert all(torch.equal(first.views[n], held_out.views[n]) for n in DIMS)
    assert not torch.equal(first.codes, held_out.codes)
    again = synthetic.planted_concepts(DIMS, 10, 2, 40, seed=3)
    assert torch.equal(first.codes, again.codes)


def test_best_cosine_finds_a_planted_direction_among_others():
    planted = torch.eye(4)[:2]
    learned = torch.cat([torch.eye(4)[[1]] * 3, torch.full((5, 4), 0.5)])
    cosines = synthetic.best_cosine(planted, learned)
    assert cosines[1] == pytest.approx(1.0) and cosines[0] == pytest.approx(0.5)


def test_token_batches_keep_rows_aligned_across_models():
    acts = {"a": torch.arange(10.0)[:, None], "b": -torch.arange(10.0)[:, None]}
    batches = synthetic.token_batches(acts, 4, seed=0)
    assert len(batches) == 2  # the incomplete last batch is dropped
    for batch in batches:
        torch.testing.assert_close(batch["b"], -batch["a"])


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="active=0"):
        synthetic.planted_concepts(DIMS, 10, 0, 5)
    with pytest.raises(ValueError, match="membership must have shape"):
        synthetic.planted_concepts(DIMS, 10, 2, 5, membership=torch.ones(10, 2, dtype=torch.bool))
