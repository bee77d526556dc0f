"""Independent per-example gradient oracles for the probe's tests (float64 in, float64 out).

``vmap_sq_norms``: ``torch.func.vmap(grad(...))`` over ``functional_call`` (the generic exact
rule, kept here as an oracle rather than shipped as a run-time path). ``loop_sq_norms``: one
autograd backward per example, for modules vmap cannot batch (RNNs, compiled modules).
Both take a per-example loss ``loss_fn(out, y) -> [B]`` on batch-first tensors and inputs whose
batch is dim ``bdim``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap


def _params(model, names):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return params if names is None else {n: params[n] for n in names}


def vmap_sq_norms(model, loss_fn, x, y, bdim=0, names=None):
    params = {n: p.detach() for n, p in _params(model, names).items()}
    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(bdim),))
        return loss_fn(out.movedim(bdim, 0), yi.unsqueeze(bdim).movedim(bdim, 0)).sum()

    g = vmap(grad(loss_one), in_dims=(None, bdim, bdim))(params, x, y)
    return sum(v.flatten(1).square().sum(1) for v in g.values())


def loop_sq_norms(model, loss_fn, x, y, bdim=0, names=None, forward=None):
    params = list(_params(model, names).values())
    forward = model if forward is None else forward
    out = []
    for b in range(x.shape[bdim]):
        xi, yi = x.narrow(bdim, b, 1), y.narrow(bdim, b, 1)
        loss = loss_fn(forward(xi).movedim(bdim, 0), yi.movedim(bdim, 0)).sum()
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(sum(g.double().square().sum() for g in gs if g is not None))
    return torch.stack(out)


def rowwise_sq_norms(losses, params):
    """Squared norms of ``grad(losses[b], params)`` for each b, from one batched forward.

    The forward that produced ``losses`` ([B], one loss per example) fixes everything random
    in it (dropout masks), so for a model that does not mix examples these are exactly the
    per-example gradients the probe measures on the same forward.
    """
    out = []
    for b in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[b], params, retain_graph=True, allow_unused=True)
        out.append(sum(g.double().square().sum() for g in gs if g is not None))
    return torch.stack(out)
