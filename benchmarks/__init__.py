"""Kernel benchmarks and the GPU check (this folder is in the repository, not in the installed package).

`bench_<family>.py` time one op family's kernels against torch eager (cuDNN) and torch.compile on real
model shapes, with the copy bandwidth and matmul ceilings measured in the same run (common.py);
`gpu_check.sh` runs the whole GPU check (triton_warmup.py, the tests, these benchmarks, the model benchmark)
and summarize.py condenses its output. Whole-model benchmarking (accuracy against throughput) is the
installed CLI `python -m fastnets.bench`, in fastnets/bench/.
"""
