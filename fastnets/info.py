"""`python -m fastnets.info`: versions, the GPU, each backend and why it is (un)usable, the compiled archs."""
import platform
import textwrap

import torch

import fastnets
from fastnets import _extension, backends


def registered_ops(namespace):
    """The names of the ops registered in torch.ops.<namespace>, as torch's dispatcher lists them."""
    prefix = namespace + "::"
    return sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def _op_lines(title, names):
    return textwrap.wrap(", ".join(names) or "none", 110, initial_indent=f"{title}: ", subsequent_indent="    ",
                         break_long_words=False, break_on_hyphens=False)


def report():
    lines = [f"fastnets {fastnets.__version__}", f"python   {platform.python_version()}", f"torch    {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton   {triton.__version__}")
    except ImportError:
        lines.append("triton   not installed")
    lines.append(f"CUDA     {torch.version.cuda or 'none (CPU-only torch)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}    {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("GPU      none visible to torch")
    lines.append(f"extension fastnets._C: {_extension.reason()}")
    stamp = _extension.stamp()
    if stamp:
        ok, why = _extension.torch_supported(stamp)
        lines.append(f"          ABI target: LibTorch stable ABI of torch {stamp.get('abi_target', '?')} (supports torch >= it)")
        lines.append(f"          built with: torch {stamp.get('torch', '?')}, CUDA {stamp.get('cuda', '?')}")
        lines.append(f"          archs:      {stamp.get('archs', '?')}")
        lines.append(f"          this torch: {'supported' if ok else 'NOT supported'}: {why}")
    build = _extension.build_info()
    if build:
        lines.append(f"          compiled for: {build}")
    user, internal = registered_ops("fastnets"), registered_ops("fastnets_cuda")
    lines += _op_lines(f"ops torch.ops.fastnets ({len(user)})", user)
    lines += _op_lines(f"internal ops torch.ops.fastnets_cuda ({len(internal)}, fastnets._C's cuda-backend primitives; "
                       "not for users)", internal)
    lines.append(f"selected backend: {backends.current_backend()} (FASTNETS_BACKEND or fastnets.use_backend)")
    for device in ("cpu", "cuda"):
        lines.append(f"backends on {device}:")
        for name in backends.CONCRETE:
            why = backends.unavailable_reason(name, device)
            lines.append(f"  {name:<9} {'usable' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()
