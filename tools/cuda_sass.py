"""Check the compiled sm_90 code (SASS) of the CUDA kernels, without a GPU.

    python tools/cuda_sass.py --check   # compile csrc/cuda/*.cu, print one line per kernel
                                        # and every problem; exit 1 on a problem

Every csrc/cuda/*.cu is compiled by nvcc to a cubin (``-Xptxas -v``: registers, spill stores
and loads, stack frame per kernel instantiation) and disassembled by Triton's bundled
``cuobjdump -sass`` (the CUDA toolkit may not ship it). Each kernel instantiation becomes a
Record: its names, the element type of its first template argument, its resources and its
instructions. The rules (module constants below, each a function from records to problem
strings):

- no spills: an instantiation that is not float64 must have no spill stores or loads and no
  LDL/STL instruction (float64 ones are reported only);
- loads first (LOADS_FIRST): within each stretch of straight-line code between loop heads
  (targets of backward branches), every global load comes before the first MUFU.EX2, so that
  the loads are all in flight before the exps wait on them;
- one exp per element (ONE_EXP): the kernel loads its elements with vector loads (.64,
  .128), and computes no more MUFU.EX2 than the elements those loads bring in;
- every kernel named by a rule is compiled (a rename cannot switch a rule off).

float64 instantiations are skipped by the loads-first and one-exp rules (a double exp is a
polynomial, no MUFU.EX2). ``compiled_kernels()`` and ``check()`` are the API for other tools
and tests; ``parse_ptxas`` and ``parse_sass`` are the pure parsers.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: tools/ is a package of the repository root
    sys.path.insert(0, ROOT)

from tools.gpu_resources import _cuobjdump, _nvcc  # noqa: E402

ARCH = 90
SOURCES = os.path.join(ROOT, "csrc", "cuda", "*.cu")
JOBS = 2  # nvcc processes at a time (each one thread)

# The forward row kernels (a row, or a tile of it, in registers): their global loads must all
# be issued before their first exp, per loop body. (The strided kernels issue 16 bytes of
# loads per column before folding them, but ptxas may move the last of a batch past the first
# exp; docs/cuda_model.md counts them as issued.)
LOADS_FIRST = (
    "softmax_rows_kernel",
    "logsumexp_rows_kernel",
    "row_parts_kernel",
    "softmax_finish_kernel",
    "cross_entropy_forward_kernel",
    "cross_entropy_loss_forward_kernel",  # the same walk, the loss as its epilogue
    "masked_softmax_rows_kernel",  # x and the mask
    "masked_softmax_long_kernel",  # per tile, both walks
)
# Kernels that load vectors and compute at most one exp per element they load.
ONE_EXP = (
    "softmax_rows_kernel",
    "softmax_finish_kernel",
    "row_parts_kernel",
    "logsumexp_rows_kernel",
    "masked_softmax_rows_kernel",  # (the long kernel's second walk exps again, as the split path)
)
EX2 = "MUFU.EX2"
GLOBAL_LOADS = ("LDG", "LDGSTS")  # base opcodes (LDGDEPBAR is no load)
LOCAL_MEMORY = ("LDL", "STL")
BRANCH = "BRA"
VECTOR_BYTES = {"128": 16, "64": 8}  # width modifier of a vector load -> bytes per load
ELEMENT_BYTES = {"float": 4, "double": 8, "fp16": 2, "bf16": 2}


@dataclasses.dataclass(slots=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers: "LDG.E.128.CONSTANT"
    operands: str  # as printed, without the trailing ";"
    predicate: str = ""  # the guard, "@P0" / "@!P0", or ""

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def modifiers(self) -> list[str]:
        return self.opcode.split(".")[1:]


@dataclasses.dataclass
class Function:
    name: str  # mangled
    instructions: list[Instruction] = dataclasses.field(default_factory=list)
    labels: dict[str, int] = dataclasses.field(default_factory=dict)  # label -> address


@dataclasses.dataclass
class Usage:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int


@dataclasses.dataclass
class Record:
    """One kernel instantiation, compiled."""

    source: str  # csrc/cuda/softmax.cu
    mangled: str
    kernel: str  # base name: softmax_rows_kernel
    name: str  # short, with template arguments: softmax_rows_kernel<bf16, float, 8>
    template_args: tuple[str, ...]
    element: str | None  # of the first template argument: float, double, fp16, bf16
    element_bytes: int | None
    fp64: bool  # a template argument is double
    registers: int
    spill_bytes: int  # stores + loads
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    instructions: list[Instruction]
    labels: dict[str, int]


# ----------------------------------------------------------------------------------------
# Parsing.


def parse_ptxas(stderr: str) -> dict[str, Usage]:
    """Per kernel (mangled name), its resources from ``ptxas -v``'s report."""
    usage = {}
    for block in re.split(r"Compiling entry function ", stderr)[1:]:
        mangled = re.match(r"'([^']+)'", block).group(1)
        props = re.search(
            r"Function properties for " + re.escape(mangled) + r"\s*\n\s*(\d+) bytes stack frame,"
            r" (\d+) bytes spill stores, (\d+) bytes spill loads",
            block,
        ) or re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block
        )
        registers = re.search(r"Used (\d+) registers", block)
        smem = re.search(r"(\d+) bytes smem", block)
        if registers is None:
            raise ValueError(f"no register count for {mangled} in the ptxas report")
        stack, stores, loads = (int(g) for g in props.groups()) if props else (0, 0, 0)
        usage[mangled] = Usage(
            registers=int(registers.group(1)),
            spill_stores=stores,
            spill_loads=loads,
            stack_bytes=stack,
            shared_bytes=int(smem.group(1)) if smem else 0,
        )
    return usage


_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")  # cuobjdump -sass
_SECTION = re.compile(r"^\.text\.(\S+):\s*$")  # nvdisasm
_LABEL = re.compile(r"^(\.L\w+|\$\S+):")  # nvdisasm (cuobjdump prints addresses, no labels)
_INSTRUCTION = re.compile(
    r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:(@!?U?P(?:T|\d+))\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*?)\s*;"
)


def parse_sass(text: str | Iterable[str]) -> dict[str, Function]:
    """Per function (mangled name), its instructions and labels, from ``cuobjdump -sass``
    (or ``nvdisasm``) output: the text, or its lines."""
    lines = text.splitlines() if isinstance(text, str) else text
    functions: dict[str, Function] = {}
    current: Function | None = None
    pending: list[str] = []  # labels waiting for the address of the next instruction
    for line in lines:
        if line.startswith("\t\tFunction") or line.startswith(".text."):
            header = _FUNCTION.match(line) or _SECTION.match(line)
            if header:
                current = functions.setdefault(header.group(1), Function(header.group(1)))
                pending = []
                continue
        if current is None:
            continue
        if line.startswith("        /*"):
            ins = _INSTRUCTION.match(line)
            if ins is None:
                continue
            address = int(ins.group(1), 16)
            for label in pending:
                current.labels[label] = address
            pending = []
            current.instructions.append(
                Instruction(address, ins.group(3), ins.group(4), ins.group(2) or "")
            )
        elif line[:1] in (".", "$"):
            label = _LABEL.match(line)
            if label:
                pending.append(label.group(1))
    return functions


def branch_target(ins: Instruction, labels: dict[str, int]) -> int | None:
    """The address a branch goes to: a label (nvdisasm) or an address (cuobjdump)."""
    label = re.search(r"\(([^)]+)\)", ins.operands)
    if label and label.group(1) in labels:
        return labels[label.group(1)]
    addresses = re.findall(r"0x([0-9a-fA-F]+)", ins.operands)
    return int(addresses[-1], 16) if addresses else None


def loop_heads(instructions: Sequence[Instruction], labels: dict[str, int]) -> list[int]:
    """Addresses that a branch at the same or a higher address goes to."""
    heads = set()
    for ins in instructions:
        if ins.base == BRANCH:
            target = branch_target(ins, labels)
            if target is not None and target <= ins.address:
                heads.add(target)
    return sorted(heads)


def _template_args(name: str) -> tuple[str, ...]:
    """The top-level arguments of ``name<...>``."""
    start = name.find("<")
    if start < 0:
        return ()
    args, depth, current = [], 0, ""
    for ch in name[start + 1 :]:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += ch
    return tuple(args + [current.strip()])


def short_name(demangled: str) -> str:
    """``void stablekernels::cuda::detail::(anonymous namespace)::k<__half, 8>(...)`` ->
    ``k<fp16, 8>``."""
    name = re.sub(r"^void ", "", demangled.strip())
    name = re.sub(r"stablekernels::cuda::(detail::)?", "", name)
    name = name.replace("(anonymous namespace)::", "")
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first "(" outside <...>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return name[:i]
    return name


def demangle(names: Sequence[str]) -> dict[str, str]:
    """One c++filt for all the names."""
    if not names:
        return {}
    out = subprocess.run(
        ["c++filt"], input="\n".join(names) + "\n", capture_output=True, text=True, check=True
    ).stdout.splitlines()
    if len(out) != len(names):
        raise RuntimeError(f"c++filt returned {len(out)} names for {len(names)}")
    return dict(zip(names, out, strict=True))


# ----------------------------------------------------------------------------------------
# Compiling.


def _compile(
    source: str, arch: int, flags: Sequence[str]
) -> tuple[dict[str, Usage], dict[str, Function]]:
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (CUDA_HOME or PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, os.path.basename(source) + ".cubin")
        run = subprocess.run(
            [
                nvcc, "-cubin", source, "-o", cubin, "-std=c++17", "-O3", "--threads", "1",
                "-I", os.path.join(ROOT, "csrc", "include"),
                f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", *flags,
            ],
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source}:\n{run.stderr[-8000:]}")
        with subprocess.Popen(
            [_cuobjdump(), "-sass", cubin], stdout=subprocess.PIPE, text=True
        ) as dump:
            functions = parse_sass(dump.stdout)  # streamed: the text is ~100 MB
        if dump.returncode != 0:
            raise RuntimeError(f"cuobjdump -sass failed on {cubin}")
    return parse_ptxas(run.stderr), functions


def _display(source: str) -> str:
    """A source of the repository relative to its root, any other as given."""
    path = os.path.abspath(source)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else source


def compile_sources(
    arch: int = ARCH, sources: Sequence[str] | None = None, flags: Sequence[str] = ()
) -> list[Record]:
    """Every kernel instantiation of ``sources`` (default csrc/cuda/*.cu) for sm_<arch>, one
    nvcc per source, JOBS at a time."""
    if sources is None:
        sources = sorted(glob.glob(SOURCES))
    with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        compiled = list(pool.map(lambda s: _compile(s, arch, flags), sources))
    names = demangle([m for usage, _ in compiled for m in usage])
    records = []
    for source, (usage, functions) in zip(sources, compiled, strict=True):
        for mangled, use in usage.items():
            if mangled not in functions:
                raise RuntimeError(f"no SASS for {mangled} in {source}")
            name = short_name(names[mangled])
            args = _template_args(name)
            element = args[0] if args and args[0] in ELEMENT_BYTES else None
            records.append(
                Record(
                    source=_display(source),
                    mangled=mangled,
                    kernel=name.split("<")[0].split("::")[-1],
                    name=name,
                    template_args=args,
                    element=element,
                    element_bytes=ELEMENT_BYTES.get(element),
                    fp64="double" in args,
                    registers=use.registers,
                    spill_bytes=use.spill_stores + use.spill_loads,
                    spill_stores=use.spill_stores,
                    spill_loads=use.spill_loads,
                    stack_bytes=use.stack_bytes,
                    shared_bytes=use.shared_bytes,
                    instructions=functions[mangled].instructions,
                    labels=functions[mangled].labels,
                )
            )
    return sorted(records, key=lambda r: (r.kernel, r.name))


def compiled_kernels(arch: int = ARCH) -> list[Record]:
    """Every kernel instantiation of csrc/cuda/*.cu, compiled for sm_<arch>."""
    return compile_sources(arch)


# ----------------------------------------------------------------------------------------
# The rules.


def local_memory_instructions(record: Record) -> list[Instruction]:
    return [i for i in record.instructions if i.base in LOCAL_MEMORY]


def no_spills(records: Sequence[Record]) -> list[str]:
    """A spill, or any local-memory access, outside float64."""
    problems = []
    for r in records:
        local = local_memory_instructions(r)
        if r.fp64 or not (r.spill_bytes or local):
            continue
        problems.append(
            f"{r.name} ({r.source}): spills {r.spill_bytes} bytes, {len(local)} LDL/STL "
            f"instructions, stack {r.stack_bytes} bytes"
        )
    return problems


def late_loads(record: Record) -> list[tuple[Instruction, Instruction]]:
    """(first EX2, global load after it) for each such load, segment by segment: a segment
    starts at each loop head."""
    heads = set(loop_heads(record.instructions, record.labels))
    late = []
    first_ex2 = None
    for ins in record.instructions:
        if ins.address in heads:
            first_ex2 = None
        if ins.opcode.startswith(EX2):
            first_ex2 = first_ex2 or ins
        elif ins.base in GLOBAL_LOADS and first_ex2 is not None:
            late.append((first_ex2, ins))
    return late


def loads_first(records: Sequence[Record], kernels: Sequence[str] = LOADS_FIRST) -> list[str]:
    """A global load after the first MUFU.EX2 of its segment (kernels in LOADS_FIRST)."""
    problems = []
    for r in records:
        if r.kernel not in kernels or r.fp64:
            continue
        late = late_loads(r)
        if late:
            ex2, load = late[0]
            problems.append(
                f"{r.name} ({r.source}): global load {load.opcode} at {load.address:#06x} after "
                f"the first {EX2} of its loop segment at {ex2.address:#06x} "
                f"({len(late)} late loads)"
            )
    return problems


def exp_count(record: Record) -> int:
    return sum(1 for i in record.instructions if i.opcode.startswith(EX2))


def vector_elements(record: Record) -> int | None:
    """Elements (of the first template argument) that the vector global loads bring in."""
    loaded = sum(
        VECTOR_BYTES[m]
        for i in record.instructions
        if i.base in GLOBAL_LOADS
        for m in i.modifiers
        if m in VECTOR_BYTES
    )
    return None if record.element_bytes is None else loaded // record.element_bytes


def one_exp_per_element(records: Sequence[Record], kernels: Sequence[str] = ONE_EXP) -> list[str]:
    """No vector load, or more MUFU.EX2 than vector-loaded elements (kernels in ONE_EXP)."""
    problems = []
    for r in records:
        if r.kernel not in kernels or r.fp64:
            continue
        exps, elements = exp_count(r), vector_elements(r)
        if elements is None:
            problems.append(
                f"{r.name} ({r.source}): first template argument {r.template_args[:1]} is not "
                f"an element type ({', '.join(ELEMENT_BYTES)}): cannot count its elements"
            )
        elif elements == 0:
            problems.append(f"{r.name} ({r.source}): not vectorised (no .64/.128 global load)")
        elif exps > elements:
            problems.append(
                f"{r.name} ({r.source}): {exps} {EX2} for {elements} vector-loaded elements "
                f"({exps / elements:.2f} per element)"
            )
    return problems


def checked_kernels_exist(
    records: Sequence[Record], kernels: Sequence[str] = LOADS_FIRST + ONE_EXP
) -> list[str]:
    """A kernel named by a rule that was not compiled, or only for float64 (skipped)."""
    found = {r.kernel for r in records}
    checked = {r.kernel for r in records if not r.fp64}
    problems = []
    for kernel in dict.fromkeys(kernels):
        if kernel not in found:
            problems.append(f"{kernel}: named by a rule of tools/cuda_sass.py, not compiled")
        elif kernel not in checked:
            problems.append(f"{kernel}: only float64 instantiations, which the rules skip")
    return problems


RULES: tuple[Callable[[Sequence[Record]], list[str]], ...] = (
    no_spills,
    loads_first,
    one_exp_per_element,
    checked_kernels_exist,
)


def check(records: Sequence[Record]) -> list[str]:
    """Every rule's problems."""
    return [problem for rule in RULES for problem in rule(records)]


def notes(records: Sequence[Record]) -> list[str]:
    """What is reported without failing: float64 spills."""
    return [
        f"{r.name}: float64, spills {r.spill_bytes} bytes, "
        f"{len(local_memory_instructions(r))} LDL/STL"
        for r in records
        if r.fp64 and (r.spill_bytes or local_memory_instructions(r))
    ]


def summary(records: Sequence[Record]) -> list[str]:
    """One line per kernel base name."""
    by_kernel = collections.defaultdict(list)
    for r in records:
        by_kernel[r.kernel].append(r)
    lines = []
    for kernel, rows in sorted(by_kernel.items()):
        line = (
            f"{kernel}: {len(rows)} instantiations, registers <= {max(r.registers for r in rows)}"
            f", spill bytes <= {max(r.spill_bytes for r in rows)}"
        )
        if kernel in ONE_EXP:
            ratios = [
                exp_count(r) / vector_elements(r) for r in rows if not r.fp64 and vector_elements(r)
            ]
            if ratios:
                line += f", {EX2}/element {min(ratios):.2f}-{max(ratios):.2f}"
        lines.append(line)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", required=True, help="compile and check")
    parser.add_argument("--arch", type=int, default=ARCH, help="sm_<ARCH> (default 90)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        records = compiled_kernels(args.arch)
    except RuntimeError as error:
        print("PROBLEM:", error)
        return 1
    for line in summary(records):
        print(line)
    for note in notes(records):
        print("note:", note)
    problems = check(records)
    for problem in problems:
        print("PROBLEM:", problem)
    sources = len({r.source for r in records})
    kernels = len({r.kernel for r in records})
    elapsed = time.monotonic() - start
    if problems:
        print(f"{len(problems)} problems in the CUDA kernels (sm_{args.arch}, {elapsed:.0f} s)")
        return 1
    print(
        f"CUDA kernels checked: {len(records)} instantiations of {kernels} kernels from "
        f"{sources} sources for sm_{args.arch}, no problems ({elapsed:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
