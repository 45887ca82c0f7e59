"""Python wrappers over the compiled CUDA C++ kernels (torch.ops.fastnets.cuda_*)."""
