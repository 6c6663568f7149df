"""Options of the pytest-benchmark suite:

pytest benchmarks/ --benchmark-only [--bench-set quick|cpu|gpu|smoke]
                   [--bench-device cpu|cuda] [--benchmark-json out.json]
"""

from __future__ import annotations

import torch

from .cases import SHAPE_SETS


def pytest_addoption(parser):
    group = parser.getgroup("stablekernels benchmarks")
    group.addoption(
        "--bench-set",
        default=None,
        choices=sorted(SHAPE_SETS),
        help="shape set (default: gpu on cuda, quick on cpu)",
    )
    group.addoption(
        "--bench-device",
        default=None,
        choices=["cpu", "cuda"],
        help="device (default: cuda if present, else cpu)",
    )


def pytest_configure(config):
    if bench_device(config) == "cpu":
        from stablekernels._timing import steady_cpu_allocator

        steady_cpu_allocator()  # as the runner does: large blocks warm or cold, never by luck


def bench_device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def bench_set(config) -> str:
    return config.getoption("--bench-set") or ("gpu" if bench_device(config) == "cuda" else "quick")


def pytest_generate_tests(metafunc):
    if {"case", "provider"} <= set(metafunc.fixturenames):
        from .cases import build_cases
        from .providers import all_providers

        device = bench_device(metafunc.config)
        pairs = [
            (case, provider)
            for case in build_cases(bench_set(metafunc.config))
            for provider in all_providers(device)
            if provider.serves(case.op, case.shape, case.dim, device)
        ]
        metafunc.parametrize(
            "case,provider",
            pairs,
            ids=[f"{c.group}-{p.name}" for c, p in pairs],
        )
