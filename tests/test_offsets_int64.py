"""64-bit indices wherever a product can pass 2**31 (issue 28, item 3), shown without a GPU and without 2**31
elements of memory.

A problem of more than 2**31 rows is made of ONE small image repeated along the batch with stride 0: the
launcher plans it at full size (N * OH * OW rows past 2**31), and the interpreter runs only the program that
handles the last rows (`single_program`), with every unmasked load and store bounds-checked against the
launch's tensors (`bounds_checked`). An index computed in int32 wraps there: the rows land outside the image
(a bounds error) or, for the augmentation noise, the Philox stream repeats (the last sample's noise equals
the first's). The weight gradient keeps int32 rows by design and is cut into launches of at most
conv.WGRAD_MAX_ROWS rows: the slicing is checked here on small shapes, the launch sizes at 2**31 rows in
tests/test_triton_launches.py.
"""
import contextlib

import numpy as np
import pytest
import torch

from conftest import GPU, assert_rel

pytestmark = pytest.mark.skipif(GPU, reason="interpreter probes (TRITON_INTERPRET=1); on a GPU: test_large_tensors.py")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as ti  # noqa: E402

from fastnets import _tensors  # noqa: E402


@contextlib.contextmanager
def single_program(choose):
    """Launches inside run one program only: choose(kernel name, full grid) -> the (x, y, z) program to run, or
    None to skip the launch. The kernel sees the full grid (num_programs) and that program's ids."""
    builder = ti.interpreter_builder
    run = ti.InterpretedFunction.run

    def one(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args), **kwargs)
        full = tuple(grid(named) if callable(grid) else grid)
        full += (1,) * (3 - len(full))
        pid = choose(self.__name__, full)
        if pid is None:
            return None
        pid = tuple(pid) + (0,) * (3 - len(pid))
        builder.set_grid_dim = lambda *_: type(builder).set_grid_dim(builder, *full)
        builder.set_grid_idx = lambda *_: type(builder).set_grid_idx(builder, *pid)
        try:
            return run(self, *args, grid=(1, 1, 1), warmup=warmup, **kwargs)
        finally:
            del builder.set_grid_dim, builder.set_grid_idx

    ti.InterpretedFunction.run = one
    try:
        yield
    finally:
        ti.InterpretedFunction.run = run


@contextlib.contextmanager
def bounds_checked():
    """Every unmasked load and store of the launches inside must fall in the storage of one of the launch's
    tensors; the first that does not raises (before touching memory)."""
    builder = ti.interpreter_builder
    init = ti.GridExecutor._init_args_hst
    ranges = []

    def capture(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        ranges.clear()
        for t in list(args_hst) + list(kwargs_hst.values()):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addrs = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        addrs = addrs[np.broadcast_to(mask.data, addrs.shape)].astype(np.uint64)
        ok = np.zeros(addrs.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (addrs >= lo) & (addrs + size <= hi)
        if not ok.all():
            raise AssertionError(f"{what} of {int((~ok).sum())} lanes outside every tensor of the launch")

    load, store = type(builder).create_masked_load, type(builder).create_masked_store

    def checked_load(ptrs, mask, other, *rest):
        check(ptrs, mask, "load")
        return load(builder, ptrs, mask, other, *rest)

    def checked_store(ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return store(builder, ptrs, value, mask, *rest)

    ti.GridExecutor._init_args_hst = capture
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    try:
        yield
    finally:
        ti.GridExecutor._init_args_hst = init
        del builder.create_masked_load, builder.create_masked_store


def _last(name, grid):
    return (grid[0] - 1, grid[1] - 1, grid[2] - 1)


def test_bounds_check_catches_an_out_of_bounds_store():
    """The probe's own check: a store one element past a tensor fails."""

    @triton.jit
    def _past_the_end(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.zeros([BLOCK], tl.float32), mask=i < n)

    x = torch.zeros(16)
    with _tensors.device_guard(x.device), bounds_checked():
        _past_the_end[(1,)](x, 16, BLOCK=32)
        with pytest.raises(Exception, match="store of 1 lanes outside"):
            _past_the_end[(1,)](x, 17, BLOCK=32)


# One image repeated along the batch: N * OH * OW = 617094 * 3480 rows, 3,440 past 2**31.
N_ROWS_PAST = 617094
H, W = 24, 145


def _rows_of_last_program(m, block_m):
    first = (-(-m // block_m) - 1) * block_m
    rows = torch.arange(first, m, dtype=torch.int64)
    return (rows // W) % H, rows % W


def test_conv_forward_rows_past_2_31():
    import fastnets.triton_kernels.conv as cv

    g = torch.Generator().manual_seed(0)
    c, cout = 3, 5
    x_img = torch.randn(1, c, H, W, generator=g)
    w = torch.randn(cout, c, 1, 1, generator=g)
    bias = torch.randn(cout, generator=g)
    y_img = torch.full((1, cout, H, W), float("nan"))
    x = x_img.expand(N_ROWS_PAST, c, H, W)
    y = y_img.expand(N_ROWS_PAST, cout, H, W)
    m = N_ROWS_PAST * H * W
    assert m > 2**31
    with single_program(_last), bounds_checked():
        cv.forward(x, w, bias, None, None, None, (1, 1), (0, 0), (1, 1), 0, y)
    oh, ow = _rows_of_last_program(m, cv._INTERP_CONFIG["BLOCK_M"])
    want = torch.nn.functional.conv2d(x_img.double(), w.double(), bias.double())[0][:, oh, ow]
    assert_rel(y_img[0][:, oh, ow], want, torch.float32, msg="the last rows' outputs")
    written = torch.zeros(H, W, dtype=torch.bool)
    written[oh, ow] = True
    assert torch.isnan(y_img[0][:, ~written]).all(), "the last program wrote rows that are not its own"


def test_conv_grad_input_rows_past_2_31():
    import fastnets.triton_kernels.conv as cv

    g = torch.Generator().manual_seed(1)
    c, cout = 4, 3
    dy_img = torch.randn(1, cout, H, W, generator=g)
    w = torch.randn(cout, c, 3, 3, generator=g)
    dx_img = torch.full((1, c, H, W), float("nan"))
    dy = dy_img.expand(N_ROWS_PAST, cout, H, W)
    dx = dx_img.expand(N_ROWS_PAST, c, H, W)
    with single_program(_last), bounds_checked():
        cv.grad_input(dy, w, dx, (1, 1), (1, 1), (1, 1))
    oh, ow = _rows_of_last_program(N_ROWS_PAST * H * W, cv._INTERP_CONFIG["BLOCK_M"])
    want = torch.nn.grad.conv2d_input((1, c, H, W), w.double(), dy_img.double(), padding=1)[0][:, oh, ow]
    assert_rel(dx_img[0][:, oh, ow], want, torch.float32, msg="grad input of the last rows")


@pytest.mark.parametrize("prologue", [False, True])
def test_conv_grad_weight_in_slices_of_the_batch(monkeypatch, prologue):
    """The weight gradient of a batch larger than one launch's row budget, summed over launches of slices of
    the batch (rows_per_split stays int32), against torch in float64; and one image over the budget refused."""
    import fastnets.triton_kernels.conv as cv
    from fastnets.activations import code

    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, 6, 5, generator=g) + 0.5
    dy = torch.randn(7, 4, 6, 5, generator=g)
    sc, sh = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    pro = (sc, sh, code("relu"), 0.0) if prologue else None
    xin = x.double()
    if prologue:
        xin = torch.relu(xin * sc.double().view(1, -1, 1, 1) + sh.double().view(1, -1, 1, 1))
    want = torch.nn.grad.conv2d_weight(xin, (4, 3, 3, 3), dy.double(), padding=1)
    monkeypatch.setattr(cv, "WGRAD_MAX_ROWS", 2 * 6 * 5)  # two images per launch: 4 launches
    from launch_checker import recording

    with recording() as launches:
        got = cv.grad_weight(dy, x, (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), prologue=pro)
    wgrad = [la for la in launches if la.kernel == "_conv_wgrad_kernel"]
    assert [la.args["M"] for la in wgrad] == [60, 60, 60, 30]
    assert_rel(got, want, torch.float32, msg="sliced grad weight")
    monkeypatch.setattr(cv, "WGRAD_MAX_ROWS", 29)
    with pytest.raises(ValueError, match="one image of 6 x 5 output pixels"):
        cv.grad_weight(dy, x, (4, 3, 3, 3), (1, 1), (1, 1), (1, 1))


@triton.jit
def _randn_at(seed_ptr, idx_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.randn(tl.load(seed_ptr).to(tl.uint32), tl.load(idx_ptr + i)))


def test_augment_noise_index_past_2_32():
    """Gaussian noise is tl.randn(seed, (n * C + c) * OH * OW + pixel): with N * C * OH * OW past 2**32 an int32
    index repeats the stream (the last sample's noise is the first sample's). The last sample's noise must
    be Philox at its true 64-bit index, and differ from the first sample's."""
    import fastnets.triton_kernels.augment as aug

    c, oh, ow = 64, 64, 64
    n = 2**32 // (c * oh * ow) + 1  # 16385 samples: sample 16384 starts at element 2**32
    x = torch.zeros(1, c, 8, 8, dtype=torch.uint8).expand(n, c, 8, 8)
    mat = torch.eye(3).repeat(n, 1, 1) * torch.tensor([[0.125, 1, 1], [1, 0.125, 1], [1, 1, 1]])
    seed = torch.tensor([987654], dtype=torch.int64)
    block = aug.plan(c)["BLOCK"]
    tiles = -(-oh * ow // block)
    noise = {}
    for sample in (0, n - 1):
        out_img = torch.full((1, c, oh, ow), float("nan"))
        out = out_img.expand(n, c, oh, ow)
        with single_program(lambda name, grid: (sample * tiles,)), bounds_checked():
            aug.apply(x, mat, None, None, False, False, False, seed, 0.0, 1.0, False, None, None, False, 0.0, out)
        noise[sample] = out_img[0].reshape(c, oh * ow)[:, :block].clone()
    idx = ((n - 1) * c + torch.arange(c, dtype=torch.int64)[:, None]) * (oh * ow) + torch.arange(block)[None, :]
    want = torch.empty(c * block)
    with _tensors.device_guard("cpu"):
        _randn_at[(1,)](seed, idx.reshape(-1).contiguous(), want, BLOCK=c * block)
    assert idx.min() >= 2**32
    torch.testing.assert_close(noise[n - 1], want.view(c, block), rtol=1e-6, atol=1e-6,
                               msg="the last sample's noise is not Philox at its 64-bit element index")
    assert not torch.allclose(noise[n - 1], noise[0]), "sample 16384 repeats sample 0's noise (an int32 index)"
