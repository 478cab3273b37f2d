"""The grid's "identical model" digest must see reconstructed weights, not only the masks."""

from types import SimpleNamespace

import torch

from kcm_cuda.evaluation.runner import _masks_digest


def _result(weight_value: float):
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(weight_value)
        model.bias.zero_()
    masks = {0: torch.tensor([True, False, True])}
    return SimpleNamespace(masks=masks, scales={0: None}, head_masks=None, model=model)


def test_same_masks_different_refit_are_different_models():
    assert _masks_digest(_result(1.0)) != _masks_digest(_result(2.0))


def test_same_masks_same_weights_are_the_same_model():
    assert _masks_digest(_result(1.0)) == _masks_digest(_result(1.0))


def test_head_masks_change_the_digest():
    a, b = _result(1.0), _result(1.0)
    b.head_masks = {0: torch.tensor([True, False])}
    assert _masks_digest(a) != _masks_digest(b)
