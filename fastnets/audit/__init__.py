"""The static performance audit of fastnets' kernels: `python -m fastnets.audit` (docs/audit.md).

Without a GPU, the compiled kernels' machine code is the performance evidence there is. The audit compiles
every Triton kernel for sm_90 (and sm_100) at every configuration its launcher or autotuner can choose for the
shape set, reads the CUDA C++ kernels of the built extension, and reports from the SASS: registers, spills,
shared memory and occupancy, MMA kind and TMA use, global access widths, main-loop instructions per K step and
MMA/issue (sass.py). Budgets and the regression check (budgets.py) run in CI; the traffic model (model.py)
predicts each op's and a ResNet-50 training step's time on an H100 from the bytes and FLOPs each kernel moves.

Modules: offline (the offline Triton driver), compile (record launches on meta tensors, compile variants),
workload (what runs: networks, op cases, standalone BatchNorm), shapes (the networks' layer shapes), sass
(parsing nvdisasm/cuobjdump output), ttir (what a Triton kernel reads and writes), triton_audit / cuda (the
two halves of the audit), hardware (the H100/B200 numbers and occupancy), budgets, report, model, measure.
Importing this package imports nothing heavy; compile.py needs TRITON_INTERPRET=0 before Triton is imported.
"""
