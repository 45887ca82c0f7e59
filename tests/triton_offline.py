"""The offline Triton driver and launch-variant key, now in fastnets/audit/offline.py (the static audit,
`python -m fastnets.audit`, compiles the same way); kept here for tests/triton_aot.py and
benchmarks/triton_warmup.py. The file is loaded by path, not as `fastnets.audit.offline`, so that importing it
still imports neither torch nor Triton (the callers keep their own import order)."""
import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastnets", "audit", "offline.py")
_spec = importlib.util.spec_from_file_location("_fastnets_audit_offline", _PATH)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

OfflineDriver = _mod.OfflineDriver
int_specialization = _mod.int_specialization
variant_key = _mod.variant_key
