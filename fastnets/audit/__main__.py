"""python -m fastnets.audit: the static performance audit of every kernel (and the traffic model). See
docs/audit.md, or --help."""
import os
import sys

# The interpreter compiles nothing: Triton must be imported with TRITON_INTERPRET=0 (before fastnets imports it).
os.environ["TRITON_INTERPRET"] = "0"
os.environ["FASTNETS_POISON_OUTPUTS"] = "0"
os.environ.pop("FASTNETS_CONV_TUNE", None)  # the autotuned path, as on a GPU by default

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "results", "sm90-static")


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m fastnets.audit",
        description="Static performance audit: compiles every Triton kernel at every configuration its launcher or "
                    "autotuner can choose for the shape set (ResNet-50, SE-ResNet-50, VGG-16 at batch 256; "
                    "bf16/fp16 channels_last, NCHW, fp32) for sm_90 (and sm_100), reads the CUDA C++ kernels of the "
                    "built extension, and reports from the machine code: registers, spills, shared memory, "
                    "occupancy, MMA kind, TMA, global access widths, main-loop instructions and MMA/issue; then "
                    "the traffic model (predicted H100 time per op and per ResNet-50 training step). No GPU needed.")
    p.add_argument("--quick", action="store_true", help="CI's subset: ResNet-50's training step, two layer1 "
                   "conv geometries and every non-conv kernel, sm_90 only; no traffic model")
    p.add_argument("--kernel", help="only the kernel of this name, else those whose name contains it (Triton or CUDA C++); "
                   "no traffic model")
    p.add_argument("--config", help="with --kernel: only configurations whose label contains this "
                   "(e.g. 128x256x64, or I=256 for a block size)")
    p.add_argument("--arch", default=None, help="comma-separated: 90 (H100), 100 (B200); default 90,100 "
                   "(90 with --quick or --kernel)")
    p.add_argument("--jobs", type=int, default=1, help="compiles at a time (each takes seconds of a core)")
    p.add_argument("--out", default=None, help=f"folder for audit.json/.md and model.json/.md (default {DEFAULT_OUT} "
                   "for the full audit; none for --quick/--kernel unless given)")
    p.add_argument("--cache-dir", default=os.environ.get("FASTNETS_AUDIT_CACHE",
                                                         os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "fastnets-audit")),
                   help="Triton's compile cache for the audit (reruns take seconds)")
    p.add_argument("--check", action="store_true", help="compare with the baseline: exit 1 on a regression; list "
                   "the budgets not met")
    p.add_argument("--baseline", default=os.path.join(DEFAULT_OUT, "audit.json"))
    p.add_argument("--budgets", default=os.path.join(DEFAULT_OUT, "budgets.json"))
    p.add_argument("--enforce-budgets", action="store_true", help="also exit 1 when a budget is not met")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels")
    p.add_argument("--no-model", action="store_true", help="skip the traffic model")
    p.add_argument("--model-only", action="store_true", help="only the traffic model")
    p.add_argument("--measured", default=None, help="the GPU check's measured rows (benchmarks.json or the "
                   "traffic JSON of python -m fastnets.audit.measure), shown beside the prediction")
    p.add_argument("--triton-only", action="store_true", help=argparse.SUPPRESS)
    return p


def _measured(path):
    if not path:
        return None
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows", [])
    out = {}
    for r in rows:
        if r.get("benchmark", "traffic") != "traffic" or not r.get("ms"):
            continue
        out.setdefault(r["op"], {})[f"{r['variant']}_ms"] = r["ms"]
    return out


def main(argv=None):
    args = _parser().parse_args(argv)
    os.makedirs(args.cache_dir, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(args.cache_dir, "triton")
    narrow = args.quick or bool(args.kernel)
    archs = [int(a) for a in (args.arch or ("90" if narrow else "90,100")).split(",")]
    out = args.out if args.out is not None else (None if narrow else DEFAULT_OUT)
    if out:
        os.makedirs(out, exist_ok=True)
    t0 = time.time()

    from . import sass

    why = sass.missing_tools()
    if why:
        print(f"fastnets.audit: cannot read SASS here: {why}", file=sys.stderr)
        return 77
    from . import compile as ac

    try:
        for a in archs:
            ac.target(a)
    except ac.Unavailable as e:
        print(f"fastnets.audit: {e}", file=sys.stderr)
        return 77

    from . import budgets as bud
    from . import cuda, report, triton_audit

    rc = 0
    if not args.model_only:
        doc = {"environment": triton_audit.environment(), "archs": archs, "triton": {}, "conv_launches": [],
               "shape_set": "quick (ResNet-50 training step, layer1 conv geometries)" if args.quick else
               "ResNet-50 training step, bf16 channels_last, every configuration the conv launches' pruning keeps; "
               "SE-ResNet-50 and VGG-16 training steps and ResNet-50 inference, bf16 channels_last, the fixed and "
               "the first kept configuration; ResNet-50 training step in fp16 channels_last, bf16 NCHW and fp32 "
               "(TF32) channels_last, one configuration per launch (the traffic model's pick); standalone "
               "BatchNorm (+ReLU, +add+ReLU, train and eval) at every ResNet-50 BatchNorm shape in bf16/fp16 "
               "channels_last and bf16 NCHW; the augmentation kernel; batch 256. sm_100: ResNet-50's training "
               "step, bf16 channels_last, one configuration per launch"}
        for arch in archs:
            spec = triton_audit.QUICK if args.quick else (triton_audit.FULL if arch == 90 else triton_audit.SM100)
            launches = triton_audit.record(spec, quick=args.quick, kernel=args.kernel,
                                           standalone=(arch == 90 and not args.quick))
            if args.config:
                launches = [ln for ln in launches if args.config in triton_audit.config_label(ln.kwargs)]
            print(f"fastnets.audit: sm_{arch}: {len(launches)} launches recorded", flush=True)
            rows, sites = triton_audit.audit(launches, arch, args.jobs)
            doc["triton"].update(rows)
            for s in sites:
                s["arch"] = arch
            doc["conv_launches"] += sites
        if 100 in archs:
            doc["sm100_note"] = ("sm_100 (B200) is compiled with Triton's ptxas-blackwell: Blackwell's tcgen05 MMA "
                                 "(UTC*MMA in SASS) keeps its shape in a run-time descriptor, so MMA/issue there "
                                 "uses the TTIR's tl.dot shapes (docs/audit.md).")
        doc["cuda"], doc["cuda_unavailable"] = ([], "skipped (--no-cuda)") if args.no_cuda else cuda.audit(
            kernel=args.kernel, archs=archs)
        if os.path.exists(args.budgets):
            doc["budgets"] = bud.evaluate(bud.load(args.budgets), doc["triton"], doc["cuda"], doc["conv_launches"])
        else:  # an installed fastnets run outside the repository: no budgets file
            print(f"fastnets.audit: no budgets file at {args.budgets}: budgets not evaluated", file=sys.stderr)
            doc["budgets"] = []
        doc["seconds"] = round(time.time() - t0, 1)
        if args.check:
            rc = _check(args, doc)
        if out:
            with open(os.path.join(out, "audit.json"), "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True, default=str)
            with open(os.path.join(out, "audit.md"), "w") as f:
                f.write(report.audit_markdown(doc))
            print(f"fastnets.audit: wrote {out}/audit.json and audit.md")
        _print_summary(doc)
    if not narrow and not args.no_model:
        from . import model

        res, _ = model.run(jobs=args.jobs)
        if out:
            with open(os.path.join(out, "model.json"), "w") as f:
                json.dump(res, f, indent=1, sort_keys=True)
            with open(os.path.join(out, "model.md"), "w") as f:
                f.write(report.model_markdown(res, _measured(args.measured)))
            print(f"fastnets.audit: wrote {out}/model.json and model.md")
        st = res["step"]
        print(f"fastnets.audit: predicted ResNet-50 step (H100, bf16, batch 256): fastnets "
              f"{st['fastnets']['us'] / 1000:.1f} ms, eager {st['eager']['us'] / 1000:.1f} ms "
              f"(fastnets/eager {st['fastnets']['us'] / st['eager']['us']:.2f}; a prediction)")
    print(f"fastnets.audit: done in {time.time() - t0:.0f} s")
    return rc


def _print_summary(doc):
    from .triton_audit import conv_launch_summary

    bad = [r for r in doc["triton"].values() if "error" in r]
    spill = [r for r in doc["triton"].values() if r.get("sass") and r["sass"]["spill_stores"]]
    print(f"fastnets.audit: {len(doc['triton'])} Triton variants ({len(bad)} failed to compile, {len(spill)} spill), "
          f"{len(doc['cuda'])} CUDA C++ kernels")
    sites = [s for s in doc["conv_launches"] if s.get("arch", 90) == 90 and s.get("every_kept_config")]
    best = [conv_launch_summary(s, doc["triton"])["best"] for s in sites]
    ok = sum(1 for b in best if b and b[1] >= 1.0 and b[2] == "HGMMA async")
    print(f"fastnets.audit: sm_90 conv launches (every kept configuration compiled) with a spill-free async "
          f"configuration at MMA/issue >= 1: {ok} of {len(sites)}")
    for b in doc["budgets"]:
        state = "nothing to check" if not b["checked"] else ("met" if b["met"] else "NOT met")
        print(f"  budget {b['id']}: {state} ({len(b['failing'])} of {b['checked']} fail)")
    for r in bad[:10]:
        print(f"  compile error: {r['kernel']} {r['config']}: {r['error'][:300]}")


def _check(args, doc):
    from . import budgets as bud

    if not os.path.exists(args.baseline):
        print(f"fastnets.audit --check: no baseline at {args.baseline}", file=sys.stderr)
        return 2
    with open(args.baseline) as f:
        base = json.load(f)
    base_rows = dict(base.get("triton", {}))
    base_rows.update({r["id"]: r for r in base.get("cuda", [])})
    cur_rows = dict(doc["triton"])
    cur_rows.update({r["id"]: r for r in doc["cuda"]})
    regs = bud.regressions(cur_rows, base_rows)
    matched = sum(1 for k in cur_rows if k in base_rows)
    doc["check"] = {"baseline": args.baseline, "matched": matched, "new": len(cur_rows) - matched,
                    "regressions": regs}
    if base.get("environment", {}).get("triton") != doc["environment"]["triton"]:
        print(f"fastnets.audit --check: note: the baseline was made with Triton {base['environment'].get('triton')}, "
              f"this is {doc['environment']['triton']}")
    print(f"fastnets.audit --check: {matched} rows compared with {args.baseline} ({len(cur_rows) - matched} not in it)")
    for what, why in regs:
        print(f"  REGRESSION {what}: {'; '.join(why)}")
    unmet = [b for b in doc["budgets"] if b["failing"]]
    for b in unmet:
        print(f"  budget not met yet here: {b['id']} ({len(b['failing'])} of {b['checked']}): {b['what']}")
        for what, why in b["failing"][:3]:
            print(f"      e.g. {what}: {'; '.join(why)}")
    for b in base.get("budgets", []):  # the full audit's verdicts (the quick subset cannot judge every budget)
        if b["failing"]:
            print(f"  budget not met in the baseline's full audit: {b['id']} ({len(b['failing'])} of {b['checked']})")
    if regs:
        print(f"fastnets.audit --check: FAILED, {len(regs)} regressions against the baseline")
        return 1
    if unmet and (args.enforce_budgets or any(b["enforced"] for b in unmet)):
        print(f"fastnets.audit --check: FAILED, {len(unmet)} budgets not met")
        return 1
    print("fastnets.audit --check: no regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())
