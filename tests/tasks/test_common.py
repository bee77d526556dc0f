import pytest
import torch

from adabatch.tasks.common import make_optimizer
from adabatch.tasks.synthetic import LeastSquaresModel


def test_optimizer_choice_and_settings():
    m = LeastSquaresModel(dim=3, optimizer="adamw", lr=1e-3, betas=(0.8, 0.95),
                          weight_decay=0.1)
    opt = m.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["lr"] == 1e-3 and g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.1
    sgd = LeastSquaresModel(dim=3, optimizer="sgd", lr=0.2, momentum=0.9).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0.0}, "lr=0.0"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"weight_decay": -1.0}, "weight_decay=-1.0"),
    ({"betas": (0.9, 1.0)}, "betas=(0.9, 1.0)"),
    ({"optimizer": "lion"}, "optimizer='lion'"),
])
def test_bad_optimizer_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LeastSquaresModel(dim=3, **kwargs)
    if "optimizer" in kwargs:
        with pytest.raises(ValueError, match="lion"):
            make_optimizer([torch.nn.Parameter(torch.zeros(1))], "lion", lr=0.1)
