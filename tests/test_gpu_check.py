"""benchmarks/summarize.py, the GPU check's verdict, on a work folder made here: steps, a junit file with the
plan's properties, benchmark rows whose compile baselines come from another step's file."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import summarize  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_gpu_plan" name="test_plan_case[batch_norm-triton-bf16-nhwc-train-256x64x112x112]">
 <properties><property name="family" value="batch_norm"/><property name="backend" value="triton"/>
 <property name="config" value="bf16-nhwc"/><property name="mode" value="train"/>
 <property name="worst_what" value="grad_x"/><property name="worst_error" value="4.000e-03"/>
 <property name="worst_ratio" value="0.500"/></properties></testcase>
<testcase classname="tests.test_gpu_plan" name="test_plan_case[batch_norm-triton-bf16-nhwc-eval-256x64x112x112]">
 <properties><property name="family" value="batch_norm"/><property name="backend" value="triton"/>
 <property name="config" value="bf16-nhwc"/><property name="mode" value="eval"/>
 <property name="worst_what" value="y"/><property name="worst_error" value="1.600e-02"/>
 <property name="worst_ratio" value="2.000"/></properties>
 <failure message="AssertionError: y: 1.6e-02 &gt; 8.0e-03">trace</failure></testcase>
<testcase classname="tests.test_gpu_plan" name="test_plan_case[squeeze_excite-cuda-bf16-nhwc-train-256x256x56x56x16]">
 <properties><property name="family" value="squeeze_excite"/><property name="backend" value="cuda"/>
 <property name="config" value="bf16-nhwc"/></properties><skipped message="no extension"/></testcase>
</testsuite></testsuites>"""


def _bench(path, part, rows):
    with open(path, "w") as f:
        json.dump({"benchmark": "squeeze_excite", "part": part, "environment": {"gpu": "X"}, "rows": rows}, f)


def test_summary_from_a_work_folder(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    (work / "bench").mkdir()
    (work / "steps.tsv").write_text("build\tPASS\t40\t150\t0\nplan\tFAIL(rc=1)\t80\t120\t1\n"
                                    "models\tSKIP(budget)\t0\t0\t\n")
    (work / "plan.xml").write_text(JUNIT)
    (work / "logs" / "plan.log").write_text("x" * 100_000 + "THE END")
    _bench(work / "bench" / "squeeze_excite-fastnets_x.json", "fastnets", [
        {"shape": "s", "pass_": "fwd+bwd", "variant": "eager", "ms": 9.0},
        {"shape": "s", "pass_": "fwd+bwd", "variant": "fastnets-triton", "ms": 2.0}])
    _bench(work / "bench" / "squeeze_excite-compile_x.json", "compile", [
        {"shape": "s", "pass_": "fwd+bwd", "variant": "compile", "ms": 1.0}])
    (work / "bench" / "broken.json").write_text('{"rows": [')  # a file cut by a kill: ignored
    (work / "memcheck-triton.xml").write_text(JUNIT.replace("batch_norm-triton", "bn-small-triton"))
    (work / "plan_workers").write_text("3\nplan workers: 3 (...)\n")
    (work / "budget.json").write_text(json.dumps({
        "steps": [{"step": "build", "estimate_seconds": 80.0, "basis": "nvcc"},
                  {"step": "plan", "estimate_seconds": 61.4, "basis": "cases"}],
        "total_seconds": 141.4, "call_seconds": 360, "budget_seconds": 345, "plan_workers": 3}))
    rc = summarize.main(["--work", str(work), "--out", str(out)])
    assert rc == 1
    assert sorted(os.listdir(out)) == ["benchmarks.json", "logs.txt", "summary.json", "table.txt"]
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] is False and s["skipped"] == ["models"]
    assert s["plan_workers"] == 3 and s["budget"]["total_seconds"] == 141.4
    assert (s["sanitizer_memcheck_triton"]["passed"], s["sanitizer_memcheck_triton"]["failed"]) == (1, 1)
    assert [x["verdict"] for x in s["steps"]] == ["PASS", "FAIL(rc=1)", "SKIP(budget)"]
    bn = s["plan_by_family"]["batch_norm/triton/bf16-nhwc"]
    assert (bn["passed"], bn["failed"], bn["skipped"]) == (1, 1, 0)
    assert bn["worst_ratio"] == 2.0 and bn["worst_error"] == 1.6e-2 and bn["worst_what"].startswith("y (eval")
    assert s["plan_by_family"]["squeeze_excite/cuda/bf16-nhwc"]["skipped"] == 1
    assert s["plan"] == {"passed": 1, "failed": 1, "skipped": 1, "failures": [
        "test_plan_case[batch_norm-triton-bf16-nhwc-eval-256x64x112x112]: AssertionError: y: 1.6e-02 > 8.0e-03"]}
    fused = next(r for r in s["benchmarks"]["rows"] if r["variant"] == "fastnets-triton")
    assert fused["vs_eager"] == 4.5 and fused["vs_compile"] == 0.5  # the compile row came from another file
    got = {t["target"]: (t["pass"], t["ratio"]) for t in fused["targets"]}
    assert got == {"SE fwd+bwd >= 3x eager": (True, 1.5), "SE fwd+bwd >= torch.compile": (False, 0.5)}
    logs = (out / "logs.txt").read_text()
    assert logs.endswith("THE END") and len(logs) < 30_000 and "tail only" in logs
    table = (out / "table.txt").read_text()
    assert "FAIL" in table and "batch_norm/triton/bf16-nhwc" in table and len(table) < 12_000
    plan_row = next(ln for ln in table.splitlines() if ln.startswith("plan "))
    assert plan_row.split()[-1] == "61"  # the predicted seconds beside the measured ones
    assert "141 s against the 360 s call" in table and "sanitizer_memcheck_triton: 1 passed, 1 failed" in table


def test_gpu_check_script_parses_and_uses_python3():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    code = [ln.split("#")[0] for ln in text.splitlines()]
    for ln in code:
        words = ln.replace('"', " ").replace("(", " ").split()
        assert "pip" not in words[:1] and "python" not in words, f"bare pip/python in: {ln.strip()}"
    assert "timeout -s INT" in text and "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in text


def test_budget_predicts_every_step_within_its_limit():
    """benchmarks/gpu_budget.py: one prediction per gpu_check.sh step, in its order; each counted at most at
    its limit, and all together within the steps' budget (what gpu_check.sh would let run)."""
    from benchmarks import gpu_budget

    limits = gpu_budget.step_limits()
    assert list(limits)[:6] == ["build", "info", "warmup", "plan", "slow", "sanitizer"]
    rows, workers = gpu_budget.estimate(80e9)
    assert [r[0] for r in rows] == list(limits) and workers == 3
    sched = gpu_budget.schedule(rows)
    assert all(counted <= min(est, limit) for _, est, limit, counted, _, _ in sched)
    assert sum(s[3] for s in sched) <= gpu_budget.BUDGET_SECONDS
    assert "PREDICTED" in gpu_budget.table(rows)
