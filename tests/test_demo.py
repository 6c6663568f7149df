"""``python -m stablekernels``: the values the demo shows are what it claims (the naive
formula fails on every classic case, stablekernels is right on each), its float32 limits are
float32's, its timing rows measure every provider with their spread beside a copy roof and
flag a busy machine, its status names the fix when a source tree without the extension
shadows a built copy, and the command exits 0."""

from __future__ import annotations

import importlib.machinery
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import stablekernels as sk
from stablekernels import __main__ as demo

CASES = {c.case: c for c in demo.failure_cases()}


def _within_rounding(value: torch.Tensor, exact: torch.Tensor) -> bool:
    """Finite and within one unit of ``value``'s dtype (relative) of ``exact``."""
    v = value.double()
    tol = torch.finfo(value.dtype).eps * exact.abs()
    return bool(torch.isfinite(v).all() and ((v - exact).abs() <= tol).all())


@pytest.mark.parametrize("name", list(CASES))
def test_stablekernels_is_right_and_naive_is_wrong_on_every_case(name):
    case = CASES[name]
    assert case.stablekernels.dtype == case.naive.dtype, name
    assert case.stablekernels.shape == case.exact.shape, name
    assert _within_rounding(case.stablekernels, case.exact), (case.stablekernels, case.exact)
    assert not _within_rounding(case.naive, case.exact), (case.naive, case.exact)


def test_the_naive_failures_are_the_ones_described():
    big = CASES["softmax([1000, 0])"].naive
    assert math.isnan(big[0]) and big[1] == 0
    assert CASES["softmax([1000, 1000])"].naive.isnan().all()
    assert CASES["softmax([-1000, -1000])"].naive.isnan().all()
    assert CASES["logsumexp([1000, 1000])"].naive.item() == math.inf
    assert CASES["log_softmax([0, -20])[0]"].naive.item() == 0.0
    half = CASES["logsumexp(70000 fp16 zeros)"]
    assert half.naive.dtype == torch.float16 and half.naive.item() == math.inf


def test_the_exact_column_is_exact():
    assert CASES["logsumexp(70000 fp16 zeros)"].exact.item() == pytest.approx(11.156251, rel=1e-7)
    assert CASES["log_softmax([0, -20])[0]"].exact.item() == pytest.approx(
        -2.0611536224385579e-09, rel=1e-12
    )
    assert CASES["logsumexp([1000, 1000])"].exact.item() == pytest.approx(1000.6931471805599)


def test_float32_limits():
    lim = demo.float32_limits()
    assert lim.small_stored == 0.0 and math.isnan(lim.small_ratio)
    assert lim.large_stored == math.inf and math.isnan(lim.large_ratio)
    assert lim.smallest == 2.0**-149  # the smallest float32 subnormal, 1.4e-45
    assert lim.largest == (2 - 2.0**-23) * 2.0**127  # 3.4e38
    assert lim.exp_1000 == math.inf and lim.exp_minus_1000 == 0.0


def test_backend_rows_list_every_backend_and_which_are_available():
    rows = demo.backend_rows()
    assert [r.name for r in rows] == list(sk.backends.BACKENDS)
    assert [r.name for r in rows if r.available] == sk.available_backends()


def test_timing_rows_measure_every_provider_on_every_shape():
    shapes = [(8, 8), (512, 512)]  # under and over WARM_BELOW_BYTES
    table = demo.timing_table(torch.device("cpu"), shapes, repeats=3)
    providers = [label for label, _ in demo.timing_providers(torch.device("cpu"))]
    assert {"stablekernels (torch)", "torch.softmax", "naive"} <= set(providers)
    assert [(r.shape, r.provider) for r in table.rows] == [
        (s, p) for s in shapes for p in providers
    ]
    for r in table.rows:
        assert 0 < r.p20_s <= r.median_s <= r.p80_s and r.samples == 3
        assert r.gbs == pytest.approx(2 * r.shape[0] * r.shape[1] * 4 / r.median_s / 1e9)
    # The copy roof, timed in the rounds of each shape from WARM_BELOW_BYTES on (not beside
    # the tiny one, whose time is the per-call cost of back-to-back calls): a read and a
    # write of 2**25 float32.
    assert [(r.shape, r.provider) for r in table.roofs] == [((512, 512), "copy")]
    for r in table.roofs:
        assert r.bytes_moved == 2 * 2**25 * 4 and r.samples == 3
        assert 0 < r.p20_s <= r.median_s <= r.p80_s
    if os.path.exists("/proc/stat"):
        assert table.other_cpus is not None and table.other_cpus >= 0


def _row(provider, p20_us, p80_us, shape=(8, 8)):
    return demo.TimingRow(
        shape, provider, (p20_us + p80_us) / 2e6, p20_us / 1e6, p80_us / 1e6, 20, 512
    )


def test_a_wide_spread_or_other_work_flags_a_busy_machine():
    steady = [_row("torch.softmax", 10, 11), _row("naive", 20, 25)]
    roof = [_row("copy", 1000, 1100)]
    assert not demo.busy_signs(demo.TimingTable(steady, roof, 0.05, 2))
    assert not demo.busy_signs(demo.TimingTable(steady, roof, None, 2))  # not Linux
    # One provider (or the copy) whose p80 is over 1.5 times its p20: named, copy first.
    noisy = demo.busy_signs(
        demo.TimingTable([*steady, _row("cpp", 10, 16)], [_row("copy", 1000, 2000)], 0.05, 2)
    )
    assert [r.provider for r in noisy.wide] == ["copy", "cpp"] and noisy.other_cpus is None
    # Narrow spreads, but other work on a CPU: every call may wait a time slice alike.
    loaded = demo.busy_signs(demo.TimingTable(steady, roof, 0.99, 2))
    assert loaded and loaded.wide == [] and loaded.other_cpus == 0.99


def test_the_timing_section_prints_the_spread_the_roof_and_the_rule(monkeypatch, capsys):
    rows = [_row("torch.softmax", 10, 30), _row("naive", 20, 25)]
    table = demo.TimingTable(rows, [_row("copy", 1000, 1100)], 0.10, 2)
    monkeypatch.setattr(demo, "timing_table", lambda device, shapes, repeats: table)
    demo.print_timing(torch.device("cpu"), 20)
    out = capsys.readouterr().out
    assert "p20-p80 us" in out and "10.0-30.0" in out
    assert "Copy roof" in out and "p20-p80 GB/s" in out
    assert "Other work kept 0.10 of the 2 CPUs busy" in out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    assert "above 1.5" in warning and "more than 0.5 CPUs" in warning  # the rule, stated
    assert "torch.softmax at 8 x 8 3.00x" in warning and "naive" not in warning


# --- A source tree without the extension in front of an installed copy with it ---------

EXT = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]


def _source_tree(root):
    """A copy of the package's Python files without the extension, setup.py beside it."""
    package = os.path.dirname(sk.__file__)
    shutil.copytree(
        package, root / "stablekernels", ignore=shutil.ignore_patterns("_C*", "__pycache__")
    )
    (root / "setup.py").write_text("")
    return root / "stablekernels"


def _installed_copy(site, with_extension=True):
    (site / "stablekernels").mkdir(parents=True)
    (site / "stablekernels" / "__init__.py").write_text("")
    if with_extension:
        (site / "stablekernels" / EXT).write_text("")
    return site / "stablekernels"


def test_a_source_tree_shadowing_an_installed_copy_is_named(tmp_path):
    imported = _source_tree(tmp_path / "repo")
    installed = _installed_copy(tmp_path / "site-packages")
    entries = [str(tmp_path / "repo"), str(tmp_path / "elsewhere"), str(tmp_path / "site-packages")]
    reason = sk.backends.missing_extension_reason(str(imported), entries)
    assert f"imported from {imported}, a source tree without the built extension" in reason
    assert f"an installed copy with the extension is at {installed}" in reason
    assert "Run from another folder" in reason
    assert "pip install --no-build-isolation -e ." in reason
    assert "is not built" not in reason


def test_a_source_tree_without_any_built_copy_is_built_in_place(tmp_path):
    imported = _source_tree(tmp_path / "repo")
    _installed_copy(tmp_path / "site-packages", with_extension=False)
    entries = [str(tmp_path / "repo"), str(tmp_path / "site-packages")]
    reason = sk.backends.missing_extension_reason(str(imported), entries)
    assert f"imported from the source tree {tmp_path / 'repo'}" in reason
    assert 'pip install --no-build-isolation -e ".[test]"` from ' in reason


def test_an_installed_copy_without_the_extension_keeps_the_plain_reason(tmp_path):
    imported = _installed_copy(tmp_path / "site-packages", with_extension=False)
    reason = sk.backends.missing_extension_reason(str(imported), [str(tmp_path / "site-packages")])
    assert reason.startswith("stablekernels._C is not built (install with")


def test_the_cpp_backend_status_names_the_installed_copy(tmp_path):
    # As python -m stablekernels from a repository root runs it: the current folder first.
    _source_tree(tmp_path / "repo")
    installed = _installed_copy(tmp_path / "site-packages")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(tmp_path / "site-packages")
    # Without the editable install's finder (this checkout's own install), which would
    # load this checkout's stablekernels._C into the copy: as after `pip install .`.
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '_EditableFinder' not in "
        "getattr(f, '__name__', type(f).__name__)]; import stablekernels as sk; "
        "print(sk.__file__); print(sk.backends.BACKENDS['cpp'].status())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path / "repo",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    imported, status = run.stdout.splitlines()
    assert imported == str(tmp_path / "repo" / "stablekernels" / "__init__.py")
    assert status.startswith("not available: stablekernels was imported from ")
    assert f"an installed copy with the extension is at {installed}" in status


def test_demo_command_exits_0():
    # As a user runs it: without the Triton interpreter the tests turn on (under which the
    # timing table's larger shapes take minutes).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "stablekernels", "--repeats", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "p20-p80 us" in run.stdout and "Copy roof" in run.stdout
    assert "looks busy" in run.stdout or "looks idle" in run.stdout
    assert "seed" not in run.stdout


def test_no_timing_skips_the_table_and_help_names_no_internal_material(capsys):
    assert demo.main(["--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "Backends on this machine" in out and "softmax forward" not in out
    assert "seed" not in out and "seed" not in demo.__doc__
