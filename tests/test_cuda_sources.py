"""The CUDA kernels compile on a machine without a GPU: every csrc/cuda/*.cu with nvcc for
sm_80 and sm_90, with no torch header on the include path and warnings as errors; and the
binding that launches them (csrc/bindings/cuda_ops.cpp) passes the C++ compiler against
torch's headers. They run on a GPU machine only (tests/test_gpu.py)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

from .conftest import SUBPROCESS_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
NVCC = shutil.which("nvcc") or (
    os.path.join(CUDA_HOME, "bin", "nvcc")
    if os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    else None
)
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME or PATH)")


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu"


@needs_nvcc
@pytest.mark.parametrize("source", [os.path.relpath(s, ROOT) for s in SOURCES])
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    command = [
        NVCC,
        "-c",
        os.path.join(ROOT, source),
        "-o",
        str(tmp_path / "kernel.o"),
        "-std=c++17",
        "-O3",
        "-I",
        os.path.join(ROOT, "csrc", "include"),
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "--threads",
        "2",  # the two targets side by side
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-6000:]
    assert "warning" not in run.stderr.lower(), run.stderr[-6000:]


@pytest.mark.skipif(
    not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")),
    reason="the CUDA toolkit headers are not installed",
)
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    # A CPU build of torch ships c10/cuda's headers but not the one CMake generates for a
    # CUDA build; an empty stand-in is enough to check the binding's syntax and types.
    generated = tmp_path / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n")
    include = [f"-I{d}" for d in cpp_extension.include_paths()]
    command = [
        "g++",
        "-fsyntax-only",
        "-std=c++17",
        "-Wall",
        os.path.join(ROOT, "csrc", "bindings", "cuda_ops.cpp"),
        f"-I{tmp_path}",
        f"-I{os.path.join(ROOT, 'csrc', 'include')}",
        f"-I{os.path.join(CUDA_HOME, 'include')}",
        f"-I{sysconfig.get_paths()['include']}",
        *include,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-6000:]


@needs_nvcc
@pytest.mark.parametrize("kind", ["wrapper script", "symbolic link"])
def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper(kind, tmp_path, monkeypatch):
    """An nvcc on PATH that is a wrapper script (as /usr/local/bin/nvcc on this project's
    machines) or a link makes torch guess CUDA_HOME as its folder's parent, which has no
    CUDA headers; setup.py finds the real toolkit instead."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sk_setup", os.path.join(ROOT, "setup.py"))
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # defines the helpers; setup() runs only as main
    real_nvcc = os.path.join(setup_module._nvcc_top(NVCC), "bin", "nvcc")
    assert os.path.isfile(real_nvcc), real_nvcc
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    if kind == "wrapper script":
        wrapper.write_text(f'#!/bin/sh\nexec "{real_nvcc}" "$@"\n')
        wrapper.chmod(0o755)
    else:
        wrapper.symlink_to(real_nvcc)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    for name in ("CUDA_HOME", "CUDA_PATH"):  # set, then unset: restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    setup_module.resolve_cuda_home()
    home = os.environ["CUDA_HOME"]
    assert os.path.exists(os.path.join(home, "include", "cuda_runtime.h")), home
    assert os.path.exists(os.path.join(home, "bin", "nvcc")), home
    assert not os.path.samefile(home, tmp_path), home
