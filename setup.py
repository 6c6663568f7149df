"""Build script: the Python package and the compiled extension ``stablekernels._C``.

The extension holds the C++ CPU kernels, compiled once per CPU capability (DEFAULT, and on
x86-64 AVX2 and AVX512, each with its own compiler flags, as ATen's own kernels are; listed in
csrc/cpu/capabilities.json) and picked at run time by the capability ATen runs with; and the
CUDA kernels (csrc/cuda) when the installed torch has CUDA and nvcc is found.

Environment:
  STABLEKERNELS_NO_EXTENSION=1   install the pure-Python package only
  STABLEKERNELS_CUDA=1 | 0       force the CUDA kernels on (an error if they cannot build)
                                 or off; default: on when torch has CUDA and nvcc is found
  TORCH_CUDA_ARCH_LIST           CUDA architectures (default "8.0;9.0+PTX")
  MAX_JOBS=N                     parallel compile jobs (torch.utils.cpp_extension)
  STABLEKERNELS_DEBUG_INFO=1     keep debug information in stablekernels._C (default: none,
                                 whatever -g Python's own build flags carry)

The extension is built against the torch already installed, so build without isolation:
``pip install --no-build-isolation .``. The package then requires that torch release
(``torch==2.13.*`` when built against 2.13.0): beside another torch, pip replaces that torch
with one of this release rather than pair the extension with it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def cpu_capabilities(is_x86: bool = IS_X86) -> tuple[dict[str, list[str]], list[str]]:
    """The CPU capability builds of csrc/cpu/kernels_impl.h, from csrc/cpu/capabilities.json
    (which CMakeLists.txt reads too): each kernels_<cap>.cpp built on this machine with its
    compiler flags (its -D definitions first), and the macros that tell dispatch.cpp which
    were built."""
    with open(os.path.join(ROOT, "csrc", "cpu", "capabilities.json")) as f:
        capabilities = json.load(f)["capabilities"]
    flags, built = {}, []
    for source, cap in capabilities.items():
        if cap["x86_64_only"] and not is_x86:
            continue
        flags[f"csrc/cpu/{source}"] = [f"-D{d}" for d in cap["definitions"]] + cap["flags"]
        if cap["dispatch_macro"]:
            built.append(cap["dispatch_macro"])
    return flags, built


COMMON_SOURCES = [
    "csrc/cpu/dispatch.cpp",
    "csrc/bindings/registration.cpp",
    "csrc/bindings/python_module.cpp",
    "csrc/bindings/row_view.cpp",
    "csrc/bindings/cpu_ops.cpp",
]
CXX_FLAGS = ["-O3", "-fopenmp"]  # at::parallel_for runs on OpenMP in torch's CPU builds


def debug_info_flags() -> list[str]:
    """-g0 after the -g that Python's build flags (sysconfig CFLAGS) put on every compile: no
    debug information in the library unless STABLEKERNELS_DEBUG_INFO=1 (56.5 MB with it)."""
    return ["-g"] if os.environ.get("STABLEKERNELS_DEBUG_INFO") == "1" else ["-g0"]
CUDA_SOURCES = [
    "csrc/cuda/softmax.cu",
    "csrc/cuda/cross_entropy.cu",
    "csrc/cuda/masked_softmax.cu",
    "csrc/cuda/linear_tiles.cu",
    "csrc/bindings/cuda_ops.cpp",
]
NVCC_FLAGS = ["-O3", "-std=c++17"]


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit folder nvcc reports for itself (the TOP of ``nvcc --dryrun``)."""
    try:
        report = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in report.splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line[len("#$ TOP=") :].strip())  # the bin/.. folder
    return None


def resolve_cuda_home() -> None:
    """Point CUDA_HOME at the toolkit of the nvcc on PATH when torch would guess wrong.

    torch.utils.cpp_extension takes CUDA_HOME (or CUDA_PATH) from the environment, else the
    parent of the folder holding the first nvcc on PATH. When that nvcc is a link or a
    wrapper script (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc, say), the
    guess has no include/cuda_runtime.h and the binding fails to compile. The toolkit is
    then the link's target, or the top folder nvcc's own --dryrun names, exported before
    torch reads it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return

    def has_headers(home: str | None) -> bool:
        return home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))

    if has_headers(os.path.dirname(os.path.dirname(nvcc))):  # torch's guess is right
        return
    linked = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    home = linked if has_headers(linked) else _nvcc_top(nvcc)
    if has_headers(home):
        os.environ["CUDA_HOME"] = home


def build_cuda() -> bool:
    """Whether to build the CUDA kernels: STABLEKERNELS_CUDA=1|0, else whenever torch has
    CUDA and nvcc is found."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("STABLEKERNELS_CUDA")
    if flag == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append(f"the installed torch {torch.__version__} has no CUDA")
    if CUDA_HOME is None:
        missing.append("nvcc was not found (set CUDA_HOME)")
    if missing:
        if flag == "1":
            raise SystemExit("stablekernels: STABLEKERNELS_CUDA=1, but " + "; ".join(missing))
        return False
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return True


def extension_build() -> dict:
    """setup() arguments for stablekernels._C (none with STABLEKERNELS_NO_EXTENSION=1)."""
    if os.environ.get("STABLEKERNELS_NO_EXTENSION") == "1":
        return {}
    resolve_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(
            "stablekernels: building stablekernels._C needs torch in the build environment "
            f"({exc}). Install torch first, then build with "
            "`pip install --no-build-isolation .`, or set STABLEKERNELS_NO_EXTENSION=1."
        ) from None

    class BuildWithCapabilities(BuildExtension):
        """Compiles each capability's kernel file with its own flags, side by side (MAX_JOBS
        at a time, each in a build folder of its own: torch's ninja build writes one
        build.ninja per folder), then the rest."""

        def finalize_options(self):
            super().finalize_options()
            # One object folder for every build of this tree when asked for (CI builds an
            # editable install and a wheel): ninja then recompiles only what changed.
            shared = os.environ.get("STABLEKERNELS_BUILD_TEMP")
            if shared:
                self.build_temp = os.path.abspath(shared)

        def build_extension(self, ext):
            base = ext.extra_compile_args

            def compile_capability(item):
                source, flags = item
                name = os.path.splitext(os.path.basename(source))[0]
                return self.compiler.compile(
                    [source],
                    output_dir=os.path.join(self.build_temp, name),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={**base, "cxx": base["cxx"] + flags},
                    depends=ext.depends,
                )

            capability_sources = getattr(ext, "per_source_flags", {}).items()
            jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
            with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
                objects = [
                    o for objs in pool.map(compile_capability, capability_sources) for o in objs
                ]
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    cuda = build_cuda()
    capability_flags, capabilities_built = cpu_capabilities()
    compile_args = {"cxx": CXX_FLAGS + debug_info_flags()}
    if cuda:
        compile_args["nvcc"] = list(NVCC_FLAGS)
    extension = (CUDAExtension if cuda else CppExtension)(
        "stablekernels._C",
        COMMON_SOURCES + (CUDA_SOURCES if cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=[(name, None) for name in capabilities_built],
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
        depends=[
            os.path.join("csrc", d, f)
            for d in ("cpu", "cuda", "include/stablekernels", "bindings")
            for f in os.listdir(os.path.join(ROOT, "csrc", d))
            if f.endswith((".h", ".cuh", ".json"))
        ],
    )
    extension.per_source_flags = capability_flags
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildWithCapabilities}}


PURE_PYTHON_REQUIREMENT = "torch>=2.5"
# torch does not list numpy, yet warns at every `import torch` when it is missing ("Failed to
# initialize NumPy", torch 2.13 CPU): listed here so that a plain install imports quietly.
RUNTIME_REQUIREMENTS = ["numpy"]


def torch_requirement(extension_built: bool) -> str:
    """The torch a wheel may be installed with: the minor release the extension was built
    against (its compiled code links to that torch's C++ ABI and works with it only), or
    any supported torch for the pure-Python package."""
    if not extension_built:
        return PURE_PYTHON_REQUIREMENT
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


if __name__ == "__main__":  # run by pip and setuptools; importable by the tests
    build = extension_build()
    setup(install_requires=[torch_requirement(bool(build)), *RUNTIME_REQUIREMENTS], **build)
