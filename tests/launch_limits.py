"""The launch limits a GPU enforces and the Triton interpreter ignores (sm_90, CUDA 13), written once.

Every Triton launch the suite records (tests/launch_checker.py) and every CUDA C++ launch plan (the extension's
plan functions) is checked against them: a grid over these limits launches on a GPU with an error, or not at all,
where the interpreter runs it happily."""

GRID_X_MAX = 2**31 - 1  # blocks in x
GRID_YZ_MAX = 65535  # blocks in y and in z
THREADS_PER_BLOCK_MAX = 1024
SHARED_BYTES_MAX = 232448  # dynamic shared memory a block may opt in to on sm_90 (227 KiB)


def launch_problems(grid, threads=None, shared_bytes=None):
    """The list of limits (grid, threads per block, shared bytes) a launch breaks; empty when it is valid.
    `grid` is a 1- to 3-tuple of block counts."""
    g = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
    out = []
    if any(v < 1 for v in g):
        out.append(f"grid {g} has an empty dimension")
    if g[0] > GRID_X_MAX:
        out.append(f"grid x {g[0]} > {GRID_X_MAX}")
    for name, v in zip("yz", g[1:]):
        if v > GRID_YZ_MAX:
            out.append(f"grid {name} {v} > {GRID_YZ_MAX}")
    if threads is not None and int(threads) > THREADS_PER_BLOCK_MAX:
        out.append(f"{threads} threads per block > {THREADS_PER_BLOCK_MAX}")
    if shared_bytes is not None and int(shared_bytes) > SHARED_BYTES_MAX:
        out.append(f"{shared_bytes} bytes of shared memory > {SHARED_BYTES_MAX}")
    return out


def assert_launch_ok(what, grid, threads=None, shared_bytes=None):
    problems = launch_problems(grid, threads, shared_bytes)
    assert not problems, f"{what}: " + "; ".join(problems)
