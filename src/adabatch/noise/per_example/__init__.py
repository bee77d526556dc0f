"""Per-example squared gradient norms from module hooks, one exact norm rule per layer type.

A forward hook on each supported module keeps the module's inputs; a tensor hook on its
output receives the output-gradient during backward. As soon as every forward call a module
made in this pass has its output-gradient, the module's rule computes each example's squared
gradient norm for the module's parameters and the held tensors are released. The maths lives
in :mod:`adabatch.kernels` (formulas and citations in ``kernels/reference.py``); these files only
capture, reshape and bookkeep.

Layout: ``probe.py`` (hooks and pass bookkeeping), ``base.py`` (what rules share) and one file
per layer rule: ``linear.py``, ``conv.py``, ``embedding.py``, ``norm.py``, ``attention.py``.

Rules (B examples, T positions per example; cost per example on top of the training step):

* ``nn.Linear`` (any input rank; middle dims flattened to T): ghost norm ``<XX^T, GG^T>``
  (~2T^2(i+o) flops, T^2 memory) or materialised ``G^T X`` (~2T*i*o flops, i*o memory),
  the cheaper one per call (``method="auto"``); bias ``|sum_t g_t|^2``. Where neither is
  cheap relative to the layer (T >= 8 and both > 25% of its forward+backward flops), the
  layer's forward is swapped while attached for an ``autograd.Function`` that computes dW
  from the per-example products and the norms in the same pass (Gray et al. 2024's
  simultaneous method: no extra GEMM, the per-example products of a chunk of examples held
  at a time).
* ``nn.Conv1d/2d/3d`` (stride, padding incl. ``"same"`` and non-zero padding modes, dilation,
  groups): the input is unfolded (im2col, T = output positions, C*K/groups features per group,
  memory T*C*K per example, processed in chunks of examples) and each group is the Linear case.
* ``nn.Embedding``: ``sum_{t,s}[x_t = x_s] g_t.g_s`` with ``padding_idx`` positions excluded
  (sort + scatter-add, ~T*d).
* ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, eval-mode ``nn.BatchNorm*d`` /
  ``nn.SyncBatchNorm`` (running statistics): ``xhat`` is recomputed from the captured input
  (one extra normalisation, ~T*d), then ``|sum_t xhat_t g_t|^2`` and ``|sum_t g_t|^2``.
* ``nn.MultiheadAttention``: its projections are read from the module's own forward
  (``F.linear`` is tapped while it runs; ``bias_k``/``bias_v`` through their ``repeat`` nodes),
  so dropout, masks and the SDPA path are the forward's own and nothing is recomputed; each
  projection is then the Linear case.

Batch dim: ``batch_size`` (set per micro-batch by the callback) finds each call's batch dim
from its shape, so sequence-first layouts are exact; where several dims match (T == B), a
``batch_first`` flag (``nn.MultiheadAttention``, or the stock ``nn.Transformer*`` module a layer
sits in) or the dim resolved on an earlier pass decides, else the module is refused.

Anything else is reported, never guessed: parameters of unsupported modules, parameters
registered in two modules (tied weights need a cross term), modules whose ``forward`` is
overridden by a subclass, modules compiled with ``torch.compile`` (hooks do not run in a
compiled graph), and, at run time, calls whose batch dim cannot be resolved and parameters
whose actual gradient disagrees with what the rule saw (e.g. a weight also used functionally
elsewhere) or that received a gradient in a pass where their module's hooks never ran land in
``uncovered`` with a reason in ``uncovered_reasons`` and are excluded from ``sq_norms`` for every
pass. A BatchNorm normalising with batch statistics (train mode, affine or not) couples the
examples: no parameter then has a per-example gradient, ``coupled`` gives the reason and every
parameter is uncovered. ``recorded`` counts the passes that gave norms (0: nothing measured).
A custom layer that mixes examples without a BatchNorm (``x - x.mean(0)``) is not detected.

The run-time check (``verify=True``) compares, per parameter and backward, a random rank-one
projection ``u^T dW v`` of the real gradient (a tensor hook on the parameter) with the same
projection of the sum of the rule's per-example gradients. It costs O(numel) per parameter
plus O(T(i+o)) per example, and no host sync until ``sq_norms`` is read; it runs on the first
two passes after ``attach()`` and every ``verify_every``-th pass (a parameter used outside its
module is a property of the model's code, so sampling finds it at the first pass).
"""


# the rule table and the simultaneous Function, for tests that inspect or wrap them
from adabatch.noise.per_example.linear import _SimultaneousLinear  # noqa: F401
from adabatch.noise.per_example.probe import _RULES, PerExampleGradNorms  # noqa: F401

__all__ = ["PerExampleGradNorms"]
