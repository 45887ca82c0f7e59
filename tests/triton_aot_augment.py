"""Ahead-of-time sm_90 compile of the fused augmentation kernel, with tests/triton_aot.py's machinery: its
recorder and offline driver are imported (in a fresh process, before fastnets), `augment_launches` records
the real launcher's launches on meta tensors, and triton_aot.main compiles every distinct variant.

Usage: python tests/triton_aot_augment.py [--list] [--jobs N]; FASTNETS_AOT_FULL=1 compiles every combination
(every combination on the CIFAR shape, 52 variants, compiled cleanly with Triton 3.8); exit status and JSON line as triton_aot.py's."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_aot  # noqa: E402  (sets TRITON_INTERPRET=0 and installs the recorder first)
from triton_aot import BF16, F16, F32, launches, meta  # noqa: E402

import torch  # noqa: E402

U8 = torch.uint8
# (input shape, output size): CIFAR-10 training batches (crop/flip at 32x32), ImageNet-sized decoded images
# to a 224x224 RandomResizedCrop, MNIST (one channel).
AUG_SHAPES = [((256, 3, 32, 32), (32, 32)), ((128, 3, 375, 500), (224, 224)), ((256, 1, 28, 28), (28, 28))]


def augment_launches():
    import fastnets.triton_kernels.augment as aug

    for (shape, (oh, ow)) in AUG_SHAPES:
        n, c = shape[:2]
        mat = meta((n, 3, 3), F32)
        box = meta((n, 4), F32)
        col = meta((n, 3), F32)
        seed = meta((1,), torch.int64)
        vec = meta((c,), F32)
        sweep = shape == AUG_SHAPES[0][0]
        if triton_aot.FULL:  # every input/output dtype and layout and both interpolations on every shape
            combos = [(i, o, nr) for i in ((U8, False), (U8, True), (F32, False), (F16, True))
                      for o in ((BF16, True), (F32, False)) for nr in (False, True)]
        elif sweep:  # a few representative combinations (each variant takes seconds of ptxas on 2 cores)
            combos = [((U8, False), (BF16, True), False), ((U8, False), (BF16, True), True),
                      ((F16, True), (F32, False), False)]
        else:
            combos = [((U8, False), (BF16, True), False)]
        for (in_dtype, in_cl), (out_dtype, out_cl), nearest in combos:
            x = meta(shape, in_dtype, in_cl)
            out = meta((n, c, oh, ow), out_dtype, out_cl)
            with launches(f"augment {shape}->{(oh, ow)} {in_dtype} cl={in_cl} -> {out_dtype} cl={out_cl} "
                          f"nearest={nearest}"):
                # everything on (the contrast statistics pass included), then the plain resample
                aug.apply(x, mat, box, col, True, True, True, seed, 0.0, 0.1, True, vec, vec, nearest, 0.0, out)
                if sweep or triton_aot.FULL:
                    aug.apply(x, mat, None, None, False, False, False, None, 0.0, 0.0, True, None, None, nearest,
                              0.0, out)


triton_aot.augment_launches = augment_launches  # triton_aot.main looks families up in its own module

if __name__ == "__main__":
    sys.exit(triton_aot.main(["augment"] + sys.argv[1:]))
