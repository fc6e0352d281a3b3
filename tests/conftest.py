"""Without a GPU, qpass's Triton kernels run in Triton's interpreter (numpy on the CPU). The switch
is read when a kernel is defined, so it is set before any test imports :mod:`qpass.codegen`."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
