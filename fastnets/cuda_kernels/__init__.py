"""Python wrappers over the compiled CUDA C++ kernels: the internal ops torch.ops.fastnets_cuda.* of
fastnets._C, which users never call (their ops are torch.ops.fastnets.*)."""
