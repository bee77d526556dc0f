import pytest
import torch
from torch import nn

from adabatch.tasks.digits import DigitsCNN, DigitsData


def test_split_is_deterministic_disjoint_and_complete():
    a, b, c = DigitsData(seed=0), DigitsData(seed=0), DigitsData(seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert len(a.train_set) + len(a.val_set) == 1797
    assert len(a.val_set) == round(0.2 * 1797)
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])
    train = {tuple(x.flatten().tolist()) + (int(y),) for x, y in a.train_set}
    val = {tuple(x.flatten().tolist()) + (int(y),) for x, y in a.val_set}
    assert len(train & val) <= 5  # the dataset itself holds a few duplicate images
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,) and 0 <= x.min() and x.max() <= 1


def test_model_shapes_and_no_batchnorm():
    m = DigitsCNN()
    assert m(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    with pytest.raises(ValueError, match="momentum=1.0"):
        DigitsCNN(momentum=1.0)
    with pytest.raises(ValueError, match="optimizer='adam'"):
        DigitsCNN(optimizer="adam")


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    dm = DigitsData(batch_size=32)
    dm.setup("fit")
    m = DigitsCNN(lr=0.05)
    opt = m.configure_optimizers()
    x, y = dm.val_set.tensors
    first = m.loss((x, y)).item()
    for batch, _ in zip(dm.train_dataloader(), range(44)):
        opt.zero_grad()
        m.loss(batch).backward()
        opt.step()
    assert m.loss((x, y)).item() < 0.8 * first
