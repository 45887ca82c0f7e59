"""The conv family's `cuda` backend: cuDNN, through torch's F.conv2d and aten.convolution_backward.

fastnets has no hand-written CUDA C++ convolution. On CUDA tensors the reference primitives
(fastnets/reference/conv.py: F.conv2d, aten.convolution_backward, the epilogue in torch ops) are cuDNN
calls, so this backend is those primitives, named for what runs; use_backend("cuda") then runs whole models,
the BatchNorm parts around the convolution on the CUDA C++ kernels (the batch_norm family's `cuda`). The
measured `auto` policy (ops/_conv_auto.py) uses `conv` as its cuDNN half.
"""
from ..reference.conv import _conv as conv  # noqa: F401  (the bare convolution: F.conv2d, weight in x's dtype)
from ..reference.conv import forward, forward_stats, grad_input, grad_weight  # noqa: F401
