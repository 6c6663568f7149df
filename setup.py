"""Build script: the Python package, plus the compiled extension ``stablekernels._C`` when
its C++ sources are present (they come with the compiled-extension work; until then this
installs the pure-Python package).

Environment:
  STABLEKERNELS_NO_EXTENSION=1   install the pure-Python package only.

The extension is built against the torch already installed, so build without isolation:
``pip install --no-build-isolation .``.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_sources() -> list[str]:
    patterns = ("csrc/cpu/*.cpp", "csrc/bindings/*.cpp")
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern)))


def extension_build() -> dict:
    """setup() arguments for stablekernels._C, or none when there is nothing to build."""
    if os.environ.get("STABLEKERNELS_NO_EXTENSION") == "1" or not extension_sources():
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            "stablekernels: building stablekernels._C needs torch in the build environment "
            f"({exc}). Install torch first, then build with "
            "`pip install --no-build-isolation .`, or set STABLEKERNELS_NO_EXTENSION=1."
        ) from None
    sources = [os.path.relpath(p, ROOT) for p in extension_sources()]
    extension = CppExtension(
        "stablekernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args=["-O3"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_build())
