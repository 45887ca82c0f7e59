"""Every Triton kernel compiles for an H100 (CUDA sm_90), ahead of time and without a GPU.

The interpreter tests never compile a kernel; tests/triton_aot.py does, in a fresh process with
TRITON_INTERPRET=0 (this process has the interpreter's kernel objects, see conftest.py): it records the real
launchers' launches on meta tensors of representative shapes, as planned for an H100's 132 SMs, and compiles
each distinct variant (dtypes, layout and epilogue flags, block sizes, autotuned conv configurations) with
Triton's compiler and ptxas. FASTNETS_AOT_FULL=1 widens the sweep (every dtype and flag on every shape).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_aot.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("family", ["batch_norm", "squeeze_excite", "conv", "conv_prologue", "augment"])
def test_triton_kernels_compile_for_sm90(family):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, HELPER, family], env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(os.path.dirname(HELPER)),
    )
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if proc.returncode == 77 and report is not None:
        pytest.skip(report["unavailable"])
    assert report is not None, f"tests/triton_aot.py {family} crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    failures = report["failures"]
    detail = "\n\n".join(f"{f['launch']}\n  {f['kernel']}\n  {f['error'][:1500]}" for f in failures[:5])
    assert proc.returncode == 0 and not failures, (
        f"{len(failures)} of {report['variants']} {family} kernel variants fail to compile for sm_90 "
        f"(Triton {report['triton']}); rerun: python tests/triton_aot.py {family}\n\n{detail}"
    )
    assert report["variants"] > 0
