"""Torch's thread count: one thread for small heads, the user's choice always kept."""

from __future__ import annotations

import pytest
import torch

from genedml import threads


@pytest.fixture
def default_threads(monkeypatch):
    """torch on its default thread count (2), no thread variables set."""
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_DEFAULT", 2)
    yield
    torch.set_num_threads(before)


def test_small_heads_train_on_one_thread(default_threads):
    assert threads.threads_for_head(128, 10_000) == 1
    assert threads.threads_for_head(512, 500) == 1  # few spots
    assert threads.threads_for_head(512, 10_000) is None  # a big head keeps torch's default


def test_a_thread_count_the_user_chose_is_kept(default_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.threads_for_head(128, 100) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(3)  # torch.set_num_threads by the user
    assert threads.threads_for_head(128, 100) is None


def test_fit_of_a_small_head_runs_on_one_thread_and_restores_the_count(default_threads, monkeypatch):
    from genedml import fit

    seen = []

    class Head:
        name = "genedml"

        class settings:  # a stand-in for the head's settings dataclass
            dim, epochs = 64, 1

        def fit(self, *args, **kwargs):
            seen.append(torch.get_num_threads())
            self.history_ = {}
            return self

    fit._fit_head(Head(), [0] * 50, None, None, None, progress=False)
    assert seen == [1] and torch.get_num_threads() == 2


def test_small_work_also_limits_the_blas_and_openmp_pools(default_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threads.torch_threads(threads.threads_for_small_work()):
        assert torch.get_num_threads() == 1
        assert {p["num_threads"] for p in threadpoolctl.threadpool_info()} == {1}
    assert torch.get_num_threads() == 2


def test_device_names_are_checked_without_hardware_and_resolved_with_it():
    import pytest
    import torch

    from genedml.devices import check_device, resolve_device
    from genedml.errors import ConfigError, InputError

    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert check_device(good) == good
    for bad in ("tpu", "gpu", "cuda:", "cuda:x", "CPU", "", None, 0):
        with pytest.raises(ConfigError, match="must be auto, cpu, cuda, cuda:N or mps"):
            check_device(bad, "--device")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="numbered from 0" if torch.cuda.is_available() else "sees no CUDA device"):
        resolve_device("cuda:99")
