"""fastnets.augment: per-sample, fused data augmentation for (N, C, H, W) image batches on the GPU (or CPU).

    import torch, fastnets.augment as A
    aug = A.Augment([A.RandomResizedCrop(224), A.RandomHorizontalFlip(),
                     A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
                     A.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])],
                    out_dtype=torch.bfloat16, memory_format=torch.channels_last,
                    generator=torch.Generator("cuda").manual_seed(0))
    batch = aug(uint8_images_on_gpu)      # every image its own crop, flip and colour factors; one kernel

The transforms take torchvision.transforms.v2's names and arguments (see fastnets/nn/augment.py for what
differs); the kernel is fastnets.ops.augment.augment_apply.
"""
from .nn.augment import (  # noqa: F401
    Augment, CenterCrop, ColorJitter, GaussianNoise, Normalize, Pad, RandomAffine, RandomCrop, RandomHorizontalFlip,
    RandomPerspective, RandomResizedCrop, RandomRotation, RandomVerticalFlip, Resize,
)
from .ops.augment import augment_apply  # noqa: F401

__all__ = [
    "Augment", "CenterCrop", "ColorJitter", "GaussianNoise", "Normalize", "Pad", "RandomAffine", "RandomCrop",
    "RandomHorizontalFlip", "RandomPerspective", "RandomResizedCrop", "RandomRotation", "RandomVerticalFlip",
    "Resize", "augment_apply",
]
