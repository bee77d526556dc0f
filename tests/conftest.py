"""Test-session set-up shared by every test directory.

Triton decorates its kernels (and its own helpers) in interpreter mode only when
TRITON_INTERPRET is set at its first import, and lightning imports torch._dynamo, which
imports triton. So on a machine without a GPU, import triton here, first, under the
interpreter, then unset the variable: the kernel tests run their kernels on CPU tensors,
while `ADABATCH_KERNELS=auto` keeps every other test on the torch path.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton  # noqa: F401

            import adabatch.kernels.ghost_norms  # noqa: F401
            import adabatch.kernels.linear_norms  # noqa: F401
            import adabatch.kernels.norm_affine_norms  # noqa: F401
        except ImportError:
            pass
        finally:
            del os.environ["TRITON_INTERPRET"]
