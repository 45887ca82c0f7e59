"""tqdm progress bars when tqdm is installed; a plain fallback (a line at the start and the end) if not."""
import sys
import time


class _Plain:
    def __init__(self, iterable=None, desc="", total=None, disable=False, leave=True, **_):
        self.iterable, self.desc, self.disable = iterable, desc, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)

    def __iter__(self):
        t0 = time.perf_counter()
        if not self.disable:
            print(f"{self.desc} ...", file=sys.stderr, flush=True)
        yield from self.iterable
        if not self.disable:
            print(f"{self.desc}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def set_postfix_str(self, *_a, **_k):
        pass

    def update(self, *_a):
        pass

    def close(self):
        pass


def progress_bar(iterable=None, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Plain(iterable, **kwargs)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
