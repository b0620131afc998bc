"""The kernel builds the accel tests hold to the same results."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

import mlx_flash.accel.build as accel_build
import mlx_flash.accel.kernels as accel_kernels

X86_BUILDS = {  # name -> (CPU flags it needs, compiler flags)
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
    "vnni": ({"avx2", "fma", "f16c", "avx_vnni"}, ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"]),
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags")
            for f in line.split(":", 1)[1].split()}


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    """name -> CpuKernels: this machine's build, the portable scalar one and, on x86 CPUs that
    can run them, AVX2 without VNNI and AVX2 with 256-bit AVX-VNNI (not AVX-512); compiled
    once for every test file here."""
    reason = accel_build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CPU kernels: {reason}")
    out = tmp_path_factory.mktemp("kernels")
    found = {"native": accel_build.kernels(),
             "scalar": accel_kernels.CpuKernels(accel_build.build_library(
                 out_dir=out, flag_sets=(["-O3"],)))}
    have = cpu_flags() if platform.machine() in ("x86_64", "AMD64") else set()
    for name, (needs, flags) in X86_BUILDS.items():
        if needs <= have:
            try:
                found[name] = accel_kernels.CpuKernels(accel_build.build_library(
                    out_dir=out, flag_sets=(["-O3", *flags, "-fopenmp"],)))
            except accel_build.CpuKernelsUnavailable:
                pass  # a compiler without these flags: the other builds are still checked
    return found
