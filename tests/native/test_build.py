"""Building, caching and loading the fused kernel; and what happens when that is impossible."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_calls import call_kernel
from reference import gc_reference, ulp_tolerance
from torch import nn

from lightning_gc import native
from lightning_gc.native import build
from lightning_gc.plan import GCPlan, dense_plan


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty kernel cache, and a process that has not loaded the kernel yet (restored afterwards)."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "kernels"))
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    build._load.cache_clear()
    yield tmp_path / "kernels"
    build._load.cache_clear()


def centralized_by_a_plan() -> GCPlan:
    model = nn.Linear(30, 7)
    plan = dense_plan(model)
    model.weight.grad = torch.randn(7, 30) + torch.arange(7.0)[:, None]
    expected = gc_reference(model.weight.grad)
    plan.apply()
    torch.testing.assert_close(model.weight.grad.double(), expected, **ulp_tolerance(torch.float32))
    return plan


def test_compiled_once_then_loaded_from_the_cache(cache, monkeypatch):
    if build.compiler() is None:
        pytest.skip("no C compiler here")
    status = native.status()
    assert status.available, status.reason
    assert status.library is not None and status.library.parent == cache
    assert [p.name for p in cache.iterdir()] == [status.library.name]  # no temporary left behind
    assert centralized_by_a_plan()._executor.native is not None
    build._load.cache_clear()
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("recompiled although the library was cached"))
    assert native.status() == status


def test_library_name_depends_on_the_cpu(cache, monkeypatch):
    if build.compiler() is None:
        pytest.skip("no C compiler here")
    first = native.status().library
    build._load.cache_clear()
    monkeypatch.setattr(build, "_cpu_identity", lambda: "another CPU with other vector units")
    second = native.status().library
    assert first != second and first.exists() and second.exists()


def test_without_a_compiler_the_eager_route_runs(cache, monkeypatch, caplog):
    monkeypatch.setattr(build, "compiler", lambda: None)
    with caplog.at_level("INFO", logger=build.__name__):
        status = native.status()
    assert not status.available and "no C compiler" in status.reason
    assert "eager route" in caplog.text
    assert native.kernel() is None
    assert centralized_by_a_plan()._executor.native is None


def test_compiler_errors_are_reported_and_leave_no_file(cache, monkeypatch, tmp_path):
    if build.compiler() is None:
        pytest.skip("no C compiler here")
    broken = tmp_path / "kernel.c"
    broken.write_text("int lgc_abi_version(void) { return 1 }\n")
    monkeypatch.setattr(build, "SOURCE", broken)
    status = native.status()
    assert not status.available
    assert "failed to compile kernel.c" in status.reason and "error" in status.reason
    assert not cache.exists() or list(cache.iterdir()) == []
    centralized_by_a_plan()


def test_a_library_of_another_abi_is_refused(cache, monkeypatch):
    if build.compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(build, "ABI_VERSION", build.ABI_VERSION + 1)
    status = native.status()
    assert not status.available and "ABI" in status.reason


def test_switched_off_by_the_environment(cache, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.status() == native.NativeStatus(False, "switched off by LIGHTNING_GC_NATIVE=0")
    assert centralized_by_a_plan()._executor.native is None
    assert not cache.exists()


def test_compiler_comes_from_cc(monkeypatch, tmp_path):
    fake = tmp_path / "my-cc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", f"{fake} -O1")
    assert build.compiler() == [str(fake), "-O1"]
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    assert build.compiler() != [str(tmp_path / "missing-cc")]  # falls back to Python's compiler, or cc


@pytest.mark.slow
def test_processes_building_at_once_all_load_a_whole_library(cache):
    """DDP ranks start together: each compiles to its own temporary name and renames it into place."""
    if build.compiler() is None:
        pytest.skip("no C compiler here")
    code = "import lightning_gc.native as n; s = n.status(); assert s.available, s.reason; print(s.library)"
    env = {**__import__("os").environ, native.ENV_CACHE: str(cache)}
    runs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    outputs = [run.communicate(timeout=120)[0].strip() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert len(set(outputs)) == 1
    assert [p.name for p in cache.iterdir()] == [Path(outputs[0]).name]


def test_an_unwritable_cache_is_reported_with_the_variable_to_set(cache, monkeypatch, tmp_path):
    if build.compiler() is None:
        pytest.skip("no C compiler here")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(native.ENV_CACHE, str(blocker / "kernels"))
    status = native.status()
    assert not status.available
    assert (
        f"cannot create the kernel cache {blocker / 'kernels'}" in status.reason and native.ENV_CACHE in status.reason
    )


def test_without_openmp_the_kernel_runs_its_own_threads(cache, monkeypatch):
    """Compilers without -fopenmp (Apple clang) build the pthreads variant: same bits for any thread count."""
    if build.compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(build, "OPTIONAL_FLAGS", (("-march=native",), ()))
    kernel = native.kernel()
    assert kernel is not None
    shapes = [(33, 17), (1, 500), (64, 27), (130, 64)]
    source = [torch.randn(s, generator=torch.Generator().manual_seed(i)) + i for i, s in enumerate(shapes)]
    results = []
    for threads in (1, 3):
        grads = [g.clone() for g in source]
        call_kernel(kernel, grads, threads=threads)
        results.append(grads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for grad, before in zip(results[0], source):
        torch.testing.assert_close(grad.double(), gc_reference(before), **ulp_tolerance(torch.float32))
