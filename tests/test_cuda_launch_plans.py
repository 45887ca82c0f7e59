"""The launch plans of the CUDA C++ kernels (csrc/launch_plans.h) against the GPU's launch limits, without a GPU.

A GPU refuses a grid over 2^31 - 1 blocks in x or 65,535 in y and z, more than 1,024 threads per block or a
block over its kernel's __launch_bounds__, and more shared memory than sm_90 has (tests/launch_limits.py);
nothing on a CPU runs into these. Every launch of fastnets._C takes its grid, block and shared memory from a
plan function of launch_plans.h, so the plans are checked here for normal and extreme shapes (> 2^31 elements,
> 65,535 * 1,024 pixels per channel, C = 1, huge C, huge N), on several devices, from two sources:

  - the built extension's internal op fastnets_cuda::launch_plan (what its launchers really launch), and
  - launch_plans.h compiled on its own with the host compiler (tests/launch_plan_driver.cpp), so that a change
    to the header is checked before the extension is rebuilt (and tests/mutation.py can plant bugs in it);

and the two must agree. Besides the limits, each plan must cover all of its work (a grid-stride loop covers
what a capped grid does not, but the blocks of a plan must still reach every channel, row and chunk) and
vectorize only where its kernel may (C % vec == 0 by rows, S >= vec by planes, S % vec == 0 for the NCHW
reductions). Finally, every kernel in the library's sm_90 cubin has the __launch_bounds__ its plans say.
"""
import glob
import itertools
import os
import re
import shutil
import subprocess

import pytest
import torch

import fastnets
from fastnets import _extension
from fastnets.audit import sass

from launch_limits import assert_launch_ok

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSRC = os.path.join(ROOT, "csrc")
WARP = 32

# (SMs, max threads per SM): H100 SXM, A100, a small part, a hypothetical huge one.
DEVICES = [(132, 2048), (108, 2048), (2, 1536), (4096, 2048)]
ELEMS = (2, 4, 8)  # bf16/fp16, fp32, fp64

# (N, C, S): ResNet-50 shapes, odd small ones, and the extremes.
SHAPES = [
    (256, 64, 112 * 112), (256, 256, 56 * 56), (256, 2048, 7 * 7), (256, 1024, 14 * 14), (256, 2048, 1),
    (1, 1, 1), (3, 5, 63), (2, 1, 3), (4, 67, 15), (1000, 3, 9), (8, 16, 1600), (1, 2, 1500 * 1400),
    (2, 3, 1024 * 350211),            # > 2^31 elements, C = 3
    (1, 1, 2**31 + 5),                # one channel of > 2^31 elements, one plane
    (2**27, 1, 1),                    # 134M rows of one channel (> 65,535 * 1,024 pixels per channel)
    (1, 64, 2**27),                   # 134M pixels per channel, 64 channels
    (2**20, 64, 49),                  # N = 1M samples
    (1, 2**31 - 1, 1), (2, 2**31 - 1, 2),  # the most channels the BatchNorm kernels take (int32)
    (1, 2**24, 1024), (3, 2**20, 1025),
    (2**24, 1024, 1),                 # 2^34 planes of one element
]


def _queries():
    """Every (kind, args) checked: each family's plans over SHAPES x layouts x vec_ok x dtypes x DEVICES."""
    out = []
    for (n, c, s), cl, vec_ok, eb, (sms, tpsm) in itertools.product(SHAPES, (0, 1), (0, 1), ELEMS, DEVICES):
        out.append(("bn_elementwise", (n, c, s, cl, vec_ok, eb, sms, tpsm)))
        for fields in (2, 3):
            out.append(("bn_reduce", (n, c, s, cl, vec_ok, eb, fields, sms, tpsm)))
        out.append(("se_apply", (n, c, s, cl, vec_ok, eb, sms, tpsm)))
        for splits in sorted({1, 2, 7, min(s, 64), s}):
            if 1 <= splits <= s:
                out.append(("se_reduce", (n, c, s, splits, cl, vec_ok, eb, sms, tpsm)))
    for n, (sms, _) in itertools.product((1, 3, 64, 256, 2**20, 2**33, 2**35), DEVICES):
        out.append(("se_excite", (n, sms)))
    return out


QUERIES = _queries()

LINE = re.compile(r"(?P<kernel>\S+) grid=(\d+),(\d+),(\d+) block=(\d+),(\d+),(\d+) smem=(\d+) bound=(\d+) vec=(\d+)"
                  r"(?P<rest>.*)")


def parse(text):
    """The plan text of launch_plans.h's describe(): a list of launches as dicts."""
    launches = []
    for line in text.strip().splitlines():
        m = LINE.fullmatch(line.strip())
        assert m, f"unparsable plan line {line!r}"
        g = [int(v) for v in m.groups()[1:10]]
        d = dict(kernel=m.group("kernel"), grid=tuple(g[0:3]), block=tuple(g[3:6]), smem=g[6], bound=g[7],
                 vec=g[8])
        for kv in m.group("rest").split():
            k, v = kv.split("=")
            d[k] = int(v)
        launches.append(d)
    return launches


# ---------------------------------------------------------------------------------------------------
# The two sources of plans


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """ask(queries) -> the answers of launch_plans.h compiled on its own (tests/launch_plan_driver.cpp); None
    without a host C++ compiler."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        return None
    exe = str(tmp_path_factory.mktemp("launch_plans") / "driver")
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", CSRC,
                    os.path.join(HERE, "launch_plan_driver.cpp"), "-o", exe], check=True)

    def ask(queries):
        stdin = "".join(f"{kind} {' '.join(map(str, args))}\n" for kind, args in queries)
        out = subprocess.run([exe], input=stdin, check=True, capture_output=True, text=True).stdout
        answers = out.split("end\n")[:-1]
        assert len(answers) == len(queries)
        return dict(zip(queries, answers))

    return ask


@pytest.fixture(scope="module")
def driver_plans(driver):
    """{(kind, args): plan text} from launch_plans.h compiled on its own; None without a host C++ compiler."""
    return None if driver is None else driver(QUERIES)


def _extension_op():
    if not _extension.load() or not hasattr(torch.ops.fastnets_cuda, "launch_plan"):
        return None
    return torch.ops.fastnets_cuda.launch_plan


@pytest.fixture(scope="module")
def library_plans():
    """{(kind, args): plan text} from the built extension; None where there is none."""
    op = _extension_op()
    if op is None:
        return None
    return {(kind, args): op(kind, list(args)) for kind, args in QUERIES}


def _sources(driver_plans, library_plans):
    sources = {name: p for name, p in (("launch_plans.h", driver_plans), ("fastnets._C", library_plans)) if p}
    if not sources:
        pytest.skip("neither a host C++ compiler nor the built extension is here")
    return sources


# ---------------------------------------------------------------------------------------------------
# The checks


def _check_plan(kind, args, launches):
    """Every launch within the GPU's limits and its kernel's __launch_bounds__; the plan covers its work and
    vectorizes only where the kernel may."""
    what = f"{kind}{args}"
    for la in launches:
        threads = la["block"][0] * la["block"][1] * la["block"][2]
        assert_launch_ok(f"{what} {la['kernel']}", la["grid"], threads, la["smem"])
        assert 0 < threads <= la["bound"], f"{what} {la['kernel']}: {threads} threads > __launch_bounds__ {la['bound']}"
        assert la["vec"] >= 1 and 16 % la["vec"] == 0, what
    main = launches[0]
    vec, (gx, gy, _), (bx, by, _) = main["vec"], main["grid"], main["block"]
    if kind == "se_excite":
        assert len(launches) == 1 and main["samples"] in (1, 2, 4), what
        return
    if kind in ("bn_elementwise", "bn_reduce", "se_apply"):
        n, c, s, cl = args[:4]
    else:
        n, c, s, splits, cl = args[:5]
    eb = args[5] if kind in ("bn_elementwise", "se_apply") else args[6] if kind == "se_reduce" else args[5]
    assert vec in (1, 16 // eb), what
    vec_ok = args[4] if kind in ("bn_elementwise", "bn_reduce", "se_apply") else args[5]
    assert vec == 1 or vec_ok, f"{what}: vectorized with unaligned pointers"
    k = main["kernel"]
    if k == "rows_elementwise_kernel":
        groups, rows = (n, s) if kind == "se_apply" else (1, n * s)
        assert cl or s == 1, what
        assert c % vec == 0, f"{what}: {vec}-element vectors over {c} channels"
        assert gx * bx * vec >= c, f"{what}: the blocks reach {gx * bx * vec} of {c} channels"
        assert main["chunks"] * main["chunk_len"] >= rows, f"{what}: the chunks miss rows"
        assert (main["chunks"] - 1) * main["chunk_len"] < rows, f"{what}: an empty chunk"
        assert bx * by == 256 and by >= 1, what
        # group_of_item divides in 32 bits when a group has several chunks
        assert main["chunks"] == 1 or groups * main["chunks"] < 2**31, f"{what}: {groups * main['chunks']} items"
    elif k == "planes_elementwise_kernel":
        assert not cl and s > 1, what
        assert vec == 1 or s >= vec, f"{what}: a {vec}-element vector would span more than two planes of {s}"
        # The walk's 64-bit divisions, done on the host (plan::PlanesStep); a thread's first vector below 2^31
        # (plan::PlaneCursor::start divides in 32 bits).
        m = n * c if kind == "se_apply" else c
        step = gx * bx * vec
        assert step < 2**31, f"{what}: the grid's {step} elements per step start threads past 2^31"
        assert (main["step"], main["step_q"], main["step_r"]) == (step, step // s % m, step % s), what
        assert main["tail_chan"] == (n * c - 1) % m, what
    elif k == "bn::reduce_cl_kernel":
        assert cl or s == 1, what
        assert c % vec == 0 and gx * bx * vec >= c, what
        assert gy == main["splits"] and bx * by == 256 and (by & (by - 1)) == 0, f"{what}: by a power of two"
    elif k == "bn::reduce_nchw_tile_kernel":
        assert not cl and 1 < s <= 1024, what
        cb = max(1, min(c, 1024 // s))
        assert threads_of(main) >= cb * s and threads_of(main) % WARP == 0, what
        assert gx * cb >= c and gy == main["splits"], what
    elif k == "bn::reduce_nchw_plane_kernel":
        assert not cl and s > 1024, what
        assert gx == c and (vec == 1 or s % vec == 0), what
    elif k == "se::reduce_nchw_kernel":
        assert not cl, what
        assert vec == 1 or s % vec == 0, what
        sps = main["s_per_split"]
        assert sps % vec == 0 and sps * splits >= s, f"{what}: splits of {sps} miss part of {s}"
    elif k == "se::reduce_cl_kernel":
        assert cl, what
        assert c % vec == 0 and gx * bx * vec >= c and (by & (by - 1)) == 0, what
        assert main["s_per_split"] * splits >= s, what
    else:
        raise AssertionError(f"{what}: unknown kernel {k}")
    if kind == "bn_reduce":
        fin = launches[1]
        assert fin["kernel"] == "bn::reduce_finalize_kernel" and fin["grid"][0] * threads_of(fin) // WARP >= c, what


def threads_of(la):
    return la["block"][0] * la["block"][1] * la["block"][2]


def test_plans_within_gpu_limits(driver_plans, library_plans):
    """Every plan, from each source here, within the GPU's limits and covering its work."""
    for source, plans in _sources(driver_plans, library_plans).items():
        for (kind, args), text in plans.items():
            assert not text.startswith("error"), f"{source}: {kind}{args}: {text}"
            try:
                _check_plan(kind, args, parse(text))
            except AssertionError as e:
                raise AssertionError(f"{source}: {e}") from None


def test_library_and_header_plans_agree(driver_plans, library_plans):
    """The built library launches what launch_plans.h says (a stale build of fastnets._C fails here)."""
    if driver_plans is None or library_plans is None:
        pytest.skip("needs both a host C++ compiler and the built extension")
    differ = [(q, library_plans[q], driver_plans[q]) for q in QUERIES if library_plans[q] != driver_plans[q]]
    assert not differ, (f"{len(differ)} plans differ between fastnets._C and csrc/launch_plans.h (rebuild the "
                        f"extension?), e.g. {differ[0]}")


def test_plans_take_the_paths_the_kernels_expect(driver_plans, library_plans):
    """The dispatch the launchers rely on: channels_last (and S == 1) by rows, NCHW by planes; the BatchNorm
    reduction's three paths at their thresholds; 16-byte vectors on ResNet's bf16 shapes."""
    plans = next(iter(_sources(driver_plans, library_plans).values()))
    dev = (132, 2048)

    def first(kind, *args):
        return parse(plans[(kind, args + dev)] if (kind, args + dev) in plans else _ask(kind, args + dev))[0]

    assert first("bn_elementwise", 256, 64, 12544, 1, 1, 2)["kernel"] == "rows_elementwise_kernel"
    assert first("bn_elementwise", 256, 64, 12544, 1, 1, 2)["vec"] == 8
    assert first("bn_elementwise", 256, 2048, 1, 0, 1, 2)["kernel"] == "rows_elementwise_kernel"
    assert first("bn_elementwise", 256, 2048, 49, 0, 1, 2)["kernel"] == "planes_elementwise_kernel"
    assert first("bn_elementwise", 256, 2048, 49, 0, 1, 2)["vec"] == 8
    assert first("bn_elementwise", 2, 1, 3, 0, 1, 2)["vec"] == 1  # S < 8: one element at a time
    assert first("bn_reduce", 256, 64, 12544, 1, 1, 2, 2)["kernel"] == "bn::reduce_cl_kernel"
    assert first("bn_reduce", 256, 2048, 49, 0, 1, 2, 2)["kernel"] == "bn::reduce_nchw_tile_kernel"
    assert first("bn_reduce", 256, 64, 12544, 0, 1, 2, 2)["kernel"] == "bn::reduce_nchw_plane_kernel"
    assert first("se_reduce", 256, 256, 3136, 1, 1, 1, 2)["vec"] == 8
    assert first("se_reduce", 256, 256, 3136, 1, 0, 1, 2)["vec"] == 8
    assert first("se_apply", 256, 256, 3136, 1, 1, 2)["kernel"] == "rows_elementwise_kernel"


# (planes P, plane size S, channel indices M, vec): M divides P (BatchNorm: M = C; squeeze-excite: M = N * C);
# S >= vec where vec > 1, as the plans choose; odd S gives a numel % vec tail. On a 2-SM device the grid is
# capped and threads walk many steps (the step wraps planes and channels); on an H100 most walk one.
WALKS = [(p, s, m, vec) for p, s, m in [(1031, 97, 13), (1031, 97, 1031), (5, 100003, 5), (64, 8, 8), (512, 9, 1),
                                        (60, 1000, 3), (3, 2, 3), (7, 4099, 7), (2, 1500 * 700, 1)]
         for vec in (1, 2, 4, 8) if vec == 1 or s >= vec]


def test_kernel_index_walks_match_division(driver):
    """The index arithmetic planes_elementwise_kernel and rows_elementwise_kernel run instead of 64-bit division
    (a called subroutine with a stack frame on the GPU), run on the host for every thread of the plan's grid:
    the channel of every element (plan::PlaneCursor, plan::PlanesStep, the tail) and the group of every work
    item (plan::group_of_item) equal plain division's."""
    if driver is None:
        pytest.skip("needs a host C++ compiler")
    queries = [("planes_walk", (p, s, m, vec) + dev) for (p, s, m, vec), dev in
               itertools.product(WALKS, [(2, 1536), (132, 2048)])]
    queries += [("rows_items", (groups, rows, c, vec) + dev) for (groups, rows, c), vec, dev in itertools.product(
        [(1, 50000, 64), (7, 3000, 8), (300, 49, 16), (1, 5, 3), (100000, 1, 2)], (1, 8), [(2, 1536), (132, 2048)])]
    for q, answer in driver(queries).items():
        assert answer.startswith("ok "), f"{q}: {answer}"
    # A thread's start up to 2^31 - 1 (the plans keep it below), with planes and channel counts on both sides
    # of it: PlaneCursor::start's unsigned 32-bit division against Python's.
    starts = [("cursor_start", (i, s, m)) for i, s, m in itertools.product(
        (0, 7, 2**31 - 16, 2**31 - 1), (1, 3, 65537, 2**31 - 9, 2**31 + 5, 2**40), (1, 7, 2**31 - 1, 2**33))]
    for (_, (i, s, m)), answer in driver(starts).items():
        assert answer.split() == ["ok", str(i // s % m), str(i % s)], f"start({i}, S={s}, M={m}): {answer}"


def _ask(kind, args):
    op = _extension_op()
    if op is None:
        pytest.skip("query not in QUERIES and no extension")
    return op(kind, list(args))


def test_launch_plan_op_rejects_bad_arguments():
    op = _extension_op()
    if op is None:
        pytest.skip("the extension is not built here")
    with pytest.raises(RuntimeError, match="unknown kind 'nope'"):
        op("nope", [1])
    with pytest.raises(RuntimeError, match="bn_elementwise takes 8 arguments, got 2"):
        op("bn_elementwise", [1, 2])
    with pytest.raises(RuntimeError, match="elem_bytes must be 2, 4 or 8"):
        op("bn_elementwise", [1, 2, 3, 0, 1, 3, 132, 2048])


# ---------------------------------------------------------------------------------------------------
# __launch_bounds__ in the cubins


def _kernel_bounds(lib, arch):
    """{demangled kernel name: EIATTR_MAX_THREADS (threads) or None} of the library's cubin for `arch`."""
    elf = subprocess.run([sass.tool("cuobjdump"), "-elf", "-arch", arch, lib], check=True, capture_output=True,
                         text=True).stdout
    bounds = {name: v for name, v in sass.max_threads(elf).items() if name.startswith("_Z")}
    names = subprocess.run(["c++filt"], input="\n".join(bounds), capture_output=True, text=True, check=True).stdout
    return {d.replace("(anonymous namespace)::", ""): v for d, v in zip(names.splitlines(), bounds.values())}


def test_every_kernel_has_the_launch_bounds_of_its_plans(driver_plans, library_plans):
    """Each __global__ of fastnets._C carries __launch_bounds__ (EIATTR_MAX_THREADS), equal to the bound its
    plans state, and every kernel has a plan. Read from the sm_90 cubin (the bounds are in the source, the same
    for every arch; dumping one cubin's ELF takes ~10 s)."""
    if _extension_op() is None:
        pytest.skip("the extension is not built here")
    if sass.tool("cuobjdump") is None or shutil.which("c++filt") is None:
        pytest.skip("needs cuobjdump and c++filt")
    libs = glob.glob(os.path.join(os.path.dirname(fastnets.__file__), "_C*.so"))
    assert len(libs) == 1, libs
    plans = next(iter(_sources(driver_plans, library_plans).values()))
    bound_of = {}  # plan kernel name -> bound
    for text in plans.values():
        for la in parse(text):
            assert bound_of.setdefault(la["kernel"], la["bound"]) == la["bound"], la
    for arch in ("sm_90",):
        kernels = _kernel_bounds(libs[0], arch)
        assert kernels, f"no kernels in the {arch} cubin"
        seen = set()
        for name, bound in kernels.items():
            base = re.match(r"(?:void )?fastnets::((?:\w+::)?\w+)<", name)
            assert base, f"unexpected kernel {name}"
            key = base.group(1)
            assert key in bound_of, f"{arch}: kernel {key} ({name}) has no launch plan"
            assert bound is not None, f"{arch}: {name} has no __launch_bounds__"
            assert bound == bound_of[key], f"{arch}: {name}: __launch_bounds__({bound}), its plans say {bound_of[key]}"
            seen.add(key)
        assert seen == set(bound_of), f"{arch}: planned kernels missing from the cubin: {set(bound_of) - seen}"
