"""How many CPU threads torch (and the BLAS/OpenMP pools under numpy) use for a piece of work.

Small heads (width ≤ SMALL_WIDTH, or few training spots) run many tiny matrix products: a second intra-op
thread gains little on a quiet machine and loses a lot on a busy one, where each product waits for a thread
that another process has the core for. They train on one thread. A thread count the user chose
(OMP_NUM_THREADS, MKL_NUM_THREADS, GENEDML_NUM_THREADS, or torch.set_num_threads before genedml was imported)
is always kept.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from genedml.log import log

THREAD_ENV = ("GENEDML_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SMALL_WIDTH = 256
SMALL_SPOTS = 1000
_DEFAULT: int | None = None  # torch's thread count when genedml first looked (its default unless set before)


def _torch_default() -> int:
    import torch

    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = torch.get_num_threads()
    return _DEFAULT


def user_threads() -> int | None:
    """The thread count the user chose, or None when torch runs on its default."""
    import torch

    for name in THREAD_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    current = torch.get_num_threads()
    return current if current != _torch_default() or current == 1 else None


def threads_for_head(width: int | None, n_spots: int) -> int | None:
    """1 for a small head or training set, None (torch's default) otherwise or when the user chose."""
    if user_threads() is not None:
        return None
    return 1 if (width is not None and width <= SMALL_WIDTH) or n_spots < SMALL_SPOTS else None


def threads_for_small_work() -> int | None:
    """1 for work known to be small (the demo's tiny backbone and head), unless the user chose a count."""
    return None if user_threads() is not None else 1


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` threads (None: leave as is), then restore the previous counts.

    Sets torch's intra-op threads and, through threadpoolctl (a scikit-learn dependency), the BLAS and
    OpenMP pools of numpy, scipy, scikit-learn and faiss, which spin-wait the same way.
    """
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    if n != before:
        log.debug("threads: %d (torch had %d) for small work", n, before)
        torch.set_num_threads(n)
    try:
        with _native_pools(n):
            yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _native_pools(n: int) -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n)

