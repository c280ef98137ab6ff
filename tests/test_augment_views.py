"""Fixed augmented views (``augment_views``): a sample's view is the same image every time it comes back."""

from types import SimpleNamespace

import pytest
import torch

from data_modules import DigitsDataModule
from data_modules.transforms import view_affine
from vitkd.errors import VitkdInputError


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_a_view_is_fixed_by_seed_key_and_view_not_by_the_batch():
    x, keys = _images(), [f"s{i}" for i in range(6)]
    first = view_affine(x, keys, view=1, seed=7)
    torch.testing.assert_close(view_affine(x, keys, view=1, seed=7), first, rtol=0, atol=0)
    order = [3, 0, 5, 1, 4, 2]  # another batch order: each image keeps its own view
    torch.testing.assert_close(view_affine(x[order], [keys[i] for i in order], 1, 7), first[order], rtol=0, atol=0)
    for other in (view_affine(x, keys, view=2, seed=7), view_affine(x, keys, view=1, seed=8)):
        assert all(not torch.allclose(other[i], first[i]) for i in range(6))
    assert all(not torch.allclose(first[i], x[i]) for i in range(6))  # each view moves its image


def _module(views: int, epoch: int, requested: bool) -> DigitsDataModule:
    dm = DigitsDataModule(augment=True, augment_views=views)
    if requested:
        dm.request_train_keys()
    dm.trainer = SimpleNamespace(training=True, current_epoch=epoch)
    return dm


def test_the_epoch_picks_the_view_and_keys_name_it():
    x, y, keys = _images(), torch.arange(6), [f"s{i}" for i in range(6)]
    torch.manual_seed(3)
    outs = {e: _module(2, e, requested=True).on_after_batch_transfer((x, y, keys), 0) for e in range(3)}
    torch.testing.assert_close(outs[2][0], outs[0][0], rtol=0, atol=0)  # epoch 2 is view 0 again
    assert not torch.allclose(outs[1][0], outs[0][0])
    assert outs[0][2] == [f"{k}@0" for k in keys] and outs[1][2] == [f"{k}@1" for k in keys]
    # keys drawn only for the views reach a stage that did not ask for them as a plain (x, y) batch
    plain = _module(2, 1, requested=False)
    assert plain.train_keys is True
    out = plain.on_after_batch_transfer((x, y, keys), 0)
    assert len(out) == 2
    torch.testing.assert_close(out[0], outs[1][0], rtol=0, atol=0)


def test_views_need_augmentation_and_a_count_of_zero_or_more():
    assert DigitsDataModule(augment=False, augment_views=4).train_keys is False  # no augmentation: no views
    with pytest.raises(VitkdInputError, match="augment_views -1 must be 0"):
        DigitsDataModule(augment_views=-1)
