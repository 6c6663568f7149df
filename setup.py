"""Build script: the Python package and the compiled extension ``stablekernels._C``.

The extension holds the C++ CPU kernels, compiled once per CPU capability (DEFAULT, and on
x86-64 AVX2 and AVX512, each with its own compiler flags, as ATen's own kernels are) and
picked at run time by the capability ATen runs with.

Environment:
  STABLEKERNELS_NO_EXTENSION=1   install the pure-Python package only
  STABLEKERNELS_CUDA=1           ask for the CUDA kernels (refused: none in this version)
  MAX_JOBS=N                     parallel compile jobs (torch.utils.cpp_extension)

The extension is built against the torch already installed, so build without isolation:
``pip install --no-build-isolation .``
"""

from __future__ import annotations

import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# Compiler flags of each CPU capability's copy of csrc/cpu/kernels_impl.h.
CAPABILITY_FLAGS = {
    "csrc/cpu/kernels_default.cpp": ["-DCPU_CAPABILITY=DEFAULT"],
}
if IS_X86:
    CAPABILITY_FLAGS.update(
        {
            "csrc/cpu/kernels_avx2.cpp": [
                "-DCPU_CAPABILITY=AVX2",
                "-DCPU_CAPABILITY_AVX2",
                "-mavx2",
                "-mfma",
                "-mf16c",
            ],
            "csrc/cpu/kernels_avx512.cpp": [
                "-DCPU_CAPABILITY=AVX512",
                "-DCPU_CAPABILITY_AVX512",
                "-mavx512f",
                "-mavx512bw",
                "-mavx512vl",
                "-mavx512dq",
                "-mfma",
                "-mf16c",
            ],
        }
    )
COMMON_SOURCES = [
    "csrc/cpu/dispatch.cpp",
    "csrc/bindings/registration.cpp",
    "csrc/bindings/python_module.cpp",
    "csrc/bindings/row_view.cpp",
    "csrc/bindings/cpu_ops.cpp",
]
CXX_FLAGS = ["-O3", "-fopenmp"]  # at::parallel_for runs on OpenMP in torch's CPU builds


def extension_build() -> dict:
    """setup() arguments for stablekernels._C (none with STABLEKERNELS_NO_EXTENSION=1)."""
    if os.environ.get("STABLEKERNELS_NO_EXTENSION") == "1":
        return {}
    if os.environ.get("STABLEKERNELS_CUDA") == "1":
        raise SystemExit(
            "stablekernels: STABLEKERNELS_CUDA=1, but this version has no CUDA kernels to build "
            "(csrc/cuda/ is empty); unset it to build the CPU kernels"
        )
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            "stablekernels: building stablekernels._C needs torch in the build environment "
            f"({exc}). Install torch first, then build with "
            "`pip install --no-build-isolation .`, or set STABLEKERNELS_NO_EXTENSION=1."
        ) from None

    class BuildWithCapabilities(BuildExtension):
        """Compiles each capability's kernel file with its own flags, then the rest."""

        def build_extension(self, ext):
            flags_of = getattr(ext, "per_source_flags", {})
            base = ext.extra_compile_args
            cxx = list(base["cxx"] if isinstance(base, dict) else base)
            objects = []
            for source, flags in flags_of.items():
                postargs = cxx + flags
                objects += self.compiler.compile(
                    [source],
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={"cxx": postargs} if isinstance(base, dict) else postargs,
                    depends=ext.depends,
                )
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    define_macros = [("SK_HAVE_AVX2", None), ("SK_HAVE_AVX512", None)] if IS_X86 else []
    extension = CppExtension(
        "stablekernels._C",
        COMMON_SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=define_macros,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
        depends=[
            os.path.join("csrc", d, f)
            for d in ("cpu", "include/stablekernels", "bindings")
            for f in os.listdir(os.path.join(ROOT, "csrc", d))
            if f.endswith(".h")
        ],
    )
    extension.per_source_flags = CAPABILITY_FLAGS
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildWithCapabilities}}


setup(**extension_build())
