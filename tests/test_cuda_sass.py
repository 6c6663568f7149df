"""The checks on the compiled sm_90 code of the CUDA kernels (tools/cuda_sass.py), without a
GPU: the parsers on small texts, each rule on a tiny kernel compiled here by nvcc (named like
the repository's kernels, in their namespace, so that the rules apply to it), and the whole
check on csrc/cuda/*.cu: ``python tools/cuda_sass.py --check``."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from tools import cuda_model, cuda_sass
from tools.gpu_resources import _nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _have_tools() -> bool:
    if _nvcc() is None or shutil.which("c++filt") is None:
        return False
    try:
        return os.path.exists(cuda_sass._cuobjdump())
    except ImportError:  # no triton, or one without its CUDA backend
        return False


needs_nvcc = pytest.mark.skipif(
    not _have_tools(), reason="nvcc, c++filt and triton's bundled cuobjdump"
)

HEADER = """
namespace stablekernels::cuda::detail {
namespace {
"""
FOOTER = """
}  // namespace
}  // namespace stablekernels::cuda::detail
"""


def _compile(tmp_path, body: str, flags=()) -> dict[str, cuda_sass.Record]:
    """The kernel instantiations of ``body`` (kernels, then a host launcher that instantiates
    them) by their short names."""
    source = tmp_path / "kernels.cu"
    source.write_text(HEADER + body + FOOTER)
    records = cuda_sass.compile_sources(sources=[str(source)], flags=flags)
    return {r.name: r for r in records}


# ----------------------------------------------------------------------------------------
# The parsers.

CUOBJDUMP = """
\tcode for sm_90
\t\tFunction : _Z1kPKfPf
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;        /* 0x00000a00ff017b82 */
                                                                  /* 0x000fe20000000800 */
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;  /* 0x0 */
        /*0020*/                   MUFU.EX2 R5, R4 ;              /* 0x0 */
        /*0030*/              @!P0 BRA 0x10 ;                     /* 0x0 */
        /*0040*/               @P1 EXIT ;                         /* 0x0 */
        /*0050*/                   BRA 0x50;                      /* 0x0 */
\t\tFunction : _Z1gv
        /*0000*/                   STL [R1], R2 ;                 /* 0x0 */
"""

NVDISASM = """
.text._Z1kPKfPf:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0020*/                   MUFU.EX2 R5, R4 ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
        /*0040*/               @P1 EXIT ;
.L_x_1:
        /*0050*/                   BRA `(.L_x_1);
"""

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kPKfPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPKfPf
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 304 bytes smem, 368 bytes cmem[0]
ptxas info    : Compile time = 3.2 ms
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
ptxas info    : Function properties for _Z1gv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 352 bytes cmem[0]
"""


def test_parse_sass_reads_cuobjdump_output():
    functions = cuda_sass.parse_sass(CUOBJDUMP)
    assert set(functions) == {"_Z1kPKfPf", "_Z1gv"}
    k = functions["_Z1kPKfPf"].instructions
    assert [i.address for i in k] == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50]
    assert [i.opcode for i in k] == ["LDC", "LDG.E.128.CONSTANT", "MUFU.EX2", "BRA", "EXIT", "BRA"]
    assert k[1].operands == "R4, desc[UR4][R2.64]" and k[1].modifiers == ["E", "128", "CONSTANT"]
    assert [i.predicate for i in k] == ["", "", "", "@!P0", "@P1", ""]
    assert cuda_sass.loop_heads(k, {}) == [0x10, 0x50]
    assert [i.opcode for i in functions["_Z1gv"].instructions] == ["STL"]


def test_parse_sass_reads_labels_of_nvdisasm_output():
    function = cuda_sass.parse_sass(NVDISASM)["_Z1kPKfPf"]
    assert function.labels == {".L_x_0": 0x10, ".L_x_1": 0x50}
    assert function.instructions[3].predicate == "@!P0"
    assert cuda_sass.loop_heads(function.instructions, function.labels) == [0x10, 0x50]


def test_parse_ptxas_reads_each_entry():
    usage = cuda_sass.parse_ptxas(PTXAS)
    assert usage["_Z1kPKfPf"] == cuda_sass.Usage(
        registers=40, spill_stores=12, spill_loads=8, stack_bytes=16, shared_bytes=304
    )
    assert usage["_Z1gv"] == cuda_sass.Usage(8, 0, 0, 0, 0)


def test_short_names_drop_the_namespace_and_name_the_half_types():
    demangled = (
        "void stablekernels::cuda::detail::(anonymous namespace)::row_parts_kernel"
        "<__nv_bfloat16, float, 8, 4>(__nv_bfloat16 const*, float*, float*, long)"
    )
    name = cuda_sass.short_name(demangled)
    assert name == "row_parts_kernel<bf16, float, 8, 4>"
    assert cuda_sass._template_args(name) == ("bf16", "float", "8", "4")
    assert cuda_sass.short_name("void k<__half>(Layout<int, 2>)") == "k<fp16>"


# ----------------------------------------------------------------------------------------
# The rules, on tiny kernels.

# MODE 0: each float4 is exped as soon as it arrives, and the next address waits on the exps
# (unrolled: one straight segment); MODE 1: the four loads first, then the exps.
LOADS = """
template <typename T, int MODE>
__global__ void softmax_rows_kernel(const T* __restrict__ x, T* __restrict__ y, T m,
                                    int stride) {
  const float4* p = reinterpret_cast<const float4*>(x) + threadIdx.x;
  float s = 0.f;
  if (MODE == 0) {
    int at = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 v = p[at];
      s += expf(v.x - m) + expf(v.y - m) + expf(v.z - m) + expf(v.w - m);
      at += s > 1e30f ? 1 : stride;
    }
  } else {
    float4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = p[k * stride];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      s += expf(v[k].x - m) + expf(v[k].y - m) + expf(v[k].z - m) + expf(v[k].w - m);
  }
  y[threadIdx.x] = s;
}

void launch(const float* x, float* y, float m, int stride) {
  softmax_rows_kernel<float, 0><<<1, 32>>>(x, y, m, stride);
  softmax_rows_kernel<float, 1><<<1, 32>>>(x, y, m, stride);
}
"""


@needs_nvcc
def test_a_load_after_an_exp_in_straight_code_is_a_problem(tmp_path):
    kernels = _compile(tmp_path, LOADS)
    interleaved = kernels["softmax_rows_kernel<float, 0>"]
    loads_first = kernels["softmax_rows_kernel<float, 1>"]
    assert interleaved.element == "float" and interleaved.element_bytes == 4
    # No loop: the unrolled loads and exps are one segment (the only backward branch is the
    # `BRA .` after the EXIT of every function).
    heads = cuda_sass.loop_heads(interleaved.instructions, interleaved.labels)
    assert len(heads) == 1 and heads[0] > cuda_sass.late_loads(interleaved)[-1][1].address
    (problem,) = cuda_sass.loads_first([interleaved])
    ex2, load = cuda_sass.late_loads(interleaved)[0]
    assert "softmax_rows_kernel<float, 0>" in problem
    assert f"{ex2.address:#06x}" in problem and f"{load.address:#06x}" in problem
    assert ex2.opcode == "MUFU.EX2" and load.opcode.startswith("LDG") and ex2.address < load.address
    assert cuda_sass.loads_first([loads_first]) == []
    # The rule holds for the kernels it names only.
    assert cuda_sass.loads_first([dataclasses.replace(interleaved, kernel="other_kernel")]) == []
    assert cuda_sass.exp_count(loads_first) == 16  # the rule had exps to look at


# Per float4: MODE 1 one exp per element, MODE 2 two, MODE 3 one per element of scalar loads.
EXPS = """
template <typename T, int MODE>
__global__ void softmax_rows_kernel(const T* __restrict__ x, T* __restrict__ y, T m) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (MODE == 3) {
    y[i] = expf(x[i] - m);
    return;
  }
  const float4 v = reinterpret_cast<const float4*>(x)[i];
  float4 r = {expf(v.x - m), expf(v.y - m), expf(v.z - m), expf(v.w - m)};
  if (MODE == 2) {
    r.x -= expf(m - v.x);
    r.y -= expf(m - v.y);
    r.z -= expf(m - v.z);
    r.w -= expf(m - v.w);
  }
  reinterpret_cast<float4*>(y)[i] = r;
}

void launch(const float* x, float* y, float m) {
  softmax_rows_kernel<float, 1><<<1, 32>>>(x, y, m);
  softmax_rows_kernel<float, 2><<<1, 32>>>(x, y, m);
  softmax_rows_kernel<float, 3><<<1, 32>>>(x, y, m);
}
"""


@needs_nvcc
def test_more_than_one_exp_per_vector_loaded_element_is_a_problem(tmp_path):
    kernels = _compile(tmp_path, EXPS)
    one, two, scalar = (kernels[f"softmax_rows_kernel<float, {mode}>"] for mode in (1, 2, 3))
    assert cuda_sass.one_exp_per_element([one]) == []
    assert (cuda_sass.exp_count(one), cuda_sass.vector_elements(one)) == (4, 4)
    (problem,) = cuda_sass.one_exp_per_element([two])
    assert (cuda_sass.exp_count(two), cuda_sass.vector_elements(two)) == (8, 4)
    assert "8 MUFU.EX2 for 4 vector-loaded elements (2.00 per element)" in problem
    (problem,) = cuda_sass.one_exp_per_element([scalar])
    assert "not vectorised" in problem


# 48 values, all live until their mean is known, in 32 registers (2 blocks of 1024 threads
# per SM).
SPILLS = """
template <typename T>
__global__ void __launch_bounds__(1024, 2) softmax_rows_kernel(const T* x, T* y) {
  T v[48], mean = 0, var = 0;
#pragma unroll
  for (int k = 0; k < 48; ++k) {
    v[k] = x[threadIdx.x + 1024 * k];
    mean += v[k];
  }
  mean /= T(48);
#pragma unroll
  for (int k = 0; k < 48; ++k) var += (v[k] - mean) * (v[k] - mean);
  y[threadIdx.x] = var;
}

// A local array indexed at run time: local memory without spills.
template <typename T>
__global__ void local_kernel(const int* bins, T* y, int n) {
  T count[64] = {};
#pragma unroll 1
  for (int k = 0; k < n; ++k) count[bins[k] & 63] += T(1);
  y[threadIdx.x] = count[threadIdx.x & 63];
}

void launch(const float* x, float* y, const double* dx, double* dy, const int* bins) {
  softmax_rows_kernel<float><<<1, 32>>>(x, y);
  softmax_rows_kernel<double><<<1, 32>>>(dx, dy);
  local_kernel<float><<<1, 32>>>(bins, y, 3);
}
"""


@needs_nvcc
def test_spills_are_problems_except_in_float64(tmp_path):
    kernels = _compile(tmp_path, SPILLS)
    single, double = kernels["softmax_rows_kernel<float>"], kernels["softmax_rows_kernel<double>"]
    local = kernels["local_kernel<float>"]
    assert single.spill_bytes > 0 and double.spill_bytes > 0
    assert double.fp64 and not single.fp64 and double.element_bytes == 8
    assert cuda_sass.local_memory_instructions(double)
    (problem,) = cuda_sass.no_spills([single, double])
    assert problem.startswith("softmax_rows_kernel<float> ")
    assert any(
        note.startswith("softmax_rows_kernel<double>:") for note in cuda_sass.notes([double])
    )
    # No spill by ptxas's count, but LDL/STL in the code.
    assert local.spill_bytes == 0 and cuda_sass.local_memory_instructions(local)
    (problem,) = cuda_sass.no_spills([local])
    assert "local_kernel<float>" in problem


# Two loops, each loading then exping: in address order the second loop's loads follow the
# first loop's exps, but each loop body is a segment of its own.
LOOPS = """
template <typename T>
__global__ void softmax_rows_kernel(const T* __restrict__ x, const T* __restrict__ z,
                                    T* __restrict__ y, T m, int n) {
  float s = 0.f, t = 0.f;
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(x[i] - m);
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += blockDim.x) t += expf(z[i] - s);
  y[threadIdx.x] = s + t;
}

void launch(const float* x, const float* z, float* y, float m, int n) {
  softmax_rows_kernel<float><<<1, 32>>>(x, z, y, m, n);
}
"""


@needs_nvcc
def test_a_loop_body_that_loads_then_exps_is_no_problem(tmp_path):
    kernel = _compile(tmp_path, LOOPS)["softmax_rows_kernel<float>"]
    heads = cuda_sass.loop_heads(kernel.instructions, kernel.labels)
    assert len(heads) >= 3  # the two loops and the trailing `BRA .`
    first_ex2 = next(i for i in kernel.instructions if i.opcode == "MUFU.EX2")
    loads = [i for i in kernel.instructions if i.base == "LDG"]
    assert any(i.address > first_ex2.address for i in loads)  # late, but for the segments
    assert cuda_sass.loads_first([kernel]) == []


MISSING = """
template <typename T>
__global__ void softmax_rows_kernel(const T* __restrict__ x, T* __restrict__ y) {
  y[threadIdx.x] = x[threadIdx.x];
}

template <typename T>
__global__ void row_parts_kernel(const T* __restrict__ x, T* __restrict__ y) {
  y[threadIdx.x] = x[threadIdx.x];
}

void launch(const float* x, float* y, const double* dx, double* dy) {
  softmax_rows_kernel<float><<<1, 32>>>(x, y);
  row_parts_kernel<double><<<1, 32>>>(dx, dy);
}
"""


@needs_nvcc
def test_a_kernel_named_by_a_rule_must_be_compiled(tmp_path):
    records = list(_compile(tmp_path, MISSING).values())
    problems = cuda_sass.checked_kernels_exist(records)
    named = set(cuda_sass.LOADS_FIRST + cuda_sass.ONE_EXP)
    missing = named - {"softmax_rows_kernel", "row_parts_kernel"}
    assert len(problems) == len(missing) + 1
    for kernel in missing:
        assert any(p.startswith(f"{kernel}:") and "not compiled" in p for p in problems), kernel
    assert not any(p.startswith("softmax_rows_kernel") for p in problems)
    assert any(p.startswith("row_parts_kernel:") and "float64" in p for p in problems)
    assert set(problems) <= set(cuda_sass.check(records))


# ----------------------------------------------------------------------------------------
# The repository's kernels.


@needs_nvcc
def test_the_cuda_kernels_pass_the_sass_checks_and_the_bandwidth_model():
    """One compile of csrc/cuda/*.cu for both: the rules of tools/cuda_sass.py, and every
    shape class of tools/cuda_model.py estimated at TARGET_TBS or more in flight."""
    records = cuda_sass.compiled_kernels()
    assert not cuda_sass.check(records), "\n".join(cuda_sass.check(records))
    estimates = cuda_model.all_estimates(records)
    assert not cuda_model.problems(estimates), "\n".join(cuda_model.problems(estimates))
