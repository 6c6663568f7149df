"""Packaging: the wheel pins the torch its extension was built against, the license ships,
and an extension that cannot load is reported at import (and a named cpp backend raises)."""

from __future__ import annotations

import email
import os
import subprocess
import sys
import textwrap

import torch

from .conftest import SUBPROCESS_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, *args: str, env: dict[str, str]) -> str:
    """stdout of ``python -c code *args`` run in the repository root; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _metadata(tmp_path, env_extra):
    script = (
        "import sys; from setuptools import build_meta; "
        "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    tmp_path.mkdir(parents=True)
    name = _python(script, str(tmp_path), env={**os.environ, **env_extra}).strip().splitlines()[-1]
    with open(tmp_path / name / "METADATA") as f:
        return email.message_from_file(f)


def test_wheel_metadata_pins_the_torch_it_was_built_against(tmp_path):
    meta = _metadata(tmp_path / "ext", {"STABLEKERNELS_NO_EXTENSION": "0"})
    major, minor = torch.__version__.split(".")[:2]
    requires = meta.get_all("Requires-Dist")
    assert f"torch=={major}.{minor}.*" in requires
    assert "numpy" in requires  # without it, `import torch` warns on a plain install
    assert meta["License"] == "BSD-3-Clause"
    assert "LICENSE" in meta.get_all("License-File")


def test_pure_python_metadata_allows_any_supported_torch(tmp_path):
    meta = _metadata(tmp_path / "pure", {"STABLEKERNELS_NO_EXTENSION": "1"})
    assert "torch>=2.5" in meta.get_all("Requires-Dist")


BROKEN_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys, warnings

    class Broken(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError("undefined symbol: _ZN3c1017RegisterOperators")
        def exec_module(self, module):
            pass

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "stablekernels._C":
                return importlib.machinery.ModuleSpec(name, Broken())
            return None

    sys.meta_path.insert(0, Finder())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import stablekernels as sk
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print("WARNINGS", len([m for m in messages if "stablekernels._C failed to import" in m]))
    print("FIX", any("--no-build-isolation" in m for m in messages))
    import torch
    print("BACKENDS", sk.available_backends())
    try:
        sk.softmax(torch.randn(3), backend="cpp")
        print("NAMED cpp ran")
    except sk.BackendUnavailableError as exc:
        print("NAMED", "undefined symbol" in str(exc))
    """
)


def test_broken_extension_warns_once_and_a_named_backend_raises():
    env = {k: v for k, v in os.environ.items() if k != "STABLEKERNELS_BACKEND"}
    out = _python(BROKEN_EXTENSION, env=env)
    assert "WARNINGS 1" in out, out
    assert "FIX True" in out, out
    assert "'cpp'" not in out.split("BACKENDS", 1)[1].splitlines()[0], out
    assert "NAMED True" in out, out
