"""What is measured: benchmark cases (op x direction x shape x dim x dtype), the shape sets,
the inputs, the bytes each case must move, and the float64 reference its outputs are
checked against."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPS = ("softmax", "log_softmax", "logsumexp", "cross_entropy")
DIRECTIONS = ("forward", "backward")
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Every LARGE_ROW_EVERY-th row is shifted by LARGE_OFFSET: exp() of it overflows in every
# floating dtype, so the naive formula's NaN/inf shows up in the correctness column instead
# of a fast time.
LARGE_ROW_EVERY = 8
LARGE_OFFSET = 1000.0


@dataclass(frozen=True)
class Case:
    """One measurement: ``op`` in ``direction`` on a tensor of ``shape`` along ``dim``."""

    op: str
    direction: str
    shape: tuple[int, ...]
    dim: int
    dtype: torch.dtype

    @property
    def n(self) -> int:
        """Row length: the size of the reduced dim."""
        return self.shape[self.dim]

    @property
    def rows(self) -> int:
        return math.prod(self.shape) // self.n

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def read_only(self) -> bool:
        """True when the op reads its input and writes only one value per row."""
        return self.op in ("logsumexp", "cross_entropy") and self.direction == "forward"

    def bytes_moved(self) -> int:
        """The bytes the op must move at least: each input read once, each output written
        once. softmax/log_softmax forward: read x, write y; backward: read y and dy, write
        dx. logsumexp forward: read x (and write one value per row); backward: read x (and
        one lse and one dy per row), write dx."""
        size = torch.finfo(self.dtype).bits // 8
        per_row = self.rows * size
        if self.op in ("logsumexp", "cross_entropy"):
            # forward: read x (one value per row out); backward: read x, write dx
            if self.direction == "forward":
                return self.numel * size + per_row
            return 2 * self.numel * size + 2 * per_row
        return (2 if self.direction == "forward" else 3) * self.numel * size

    @property
    def shape_label(self) -> str:
        return "x".join(map(str, self.shape)) + (
            "" if self.dim in (-1, len(self.shape) - 1) else f" dim={self.dim}"
        )

    @property
    def label(self) -> str:
        return f"{self.op} {self.direction} {self.shape_label} {DTYPE_NAMES[self.dtype]}"

    @property
    def group(self) -> str:
        """The comparison group: every provider on the same op, direction, shape, dtype."""
        return (
            f"{self.op}-{self.direction}-{self.shape_label.replace(' ', '-')}-"
            f"{DTYPE_NAMES[self.dtype]}"
        )


def _rows_of(n: int, elements: int) -> int:
    return max(1, elements // n)


GPU_ROW_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144]
GPU_VOCABULARIES = [32000, 50257, 128256, 151936]
GPU_ELEMENTS = 2**28

# (shape, dim) per set.
SHAPE_SETS: dict[str, list[tuple[tuple[int, ...], int]]] = {
    # About 2^28 elements per call on a GPU (1 GiB in fp32).
    "gpu": [((_rows_of(n, GPU_ELEMENTS), n), -1) for n in GPU_ROW_LENGTHS]
    + [((_rows_of(v, GPU_ELEMENTS), v), -1) for v in GPU_VOCABULARIES]
    + [((8192, 8192), 0)],
    # Scaled down to seconds on a CPU.
    "cpu": [
        ((8192, 128), -1),
        ((4096, 1024), -1),
        ((1024, 32768), -1),
        ((1024, 50257), -1),
        ((64, 262144), -1),
        ((1024, 4096), 0),
    ],
    # --quick: a CPU run of about a minute on 2 cores (docs/benchmarks.md):
    # one short-row and one long-row shape (the full set has the others).
    "quick": [((4096, 1024), -1), ((256, 32768), -1)],
    # --smoke: the plumbing only (CI).
    "smoke": [((64, 256), -1), ((256, 64), 0)],
}
# Cross-entropy (rows, vocabulary): the vocabularies of current LLMs on a GPU; on a CPU the
# shape of the target, (4096, 32000).
CROSS_ENTROPY_SHAPES: dict[str, list[tuple[tuple[int, ...], int]]] = {
    "gpu": [((4096, v), -1) for v in (32000, 50257, 128256, 151936)],
    "cpu": [((4096, 32000), -1), ((256, 128256), -1)],
    "quick": [((1024, 32000), -1)],
    "smoke": [((64, 1000), -1)],
}
DTYPE_SETS = {
    "gpu": ["fp32", "bf16", "fp16"],
    "cpu": ["fp32", "bf16"],
    "quick": ["fp32", "bf16"],
    "smoke": ["fp32"],
}


def build_cases(shape_set: str, ops=OPS, directions=DIRECTIONS, dtypes=None) -> list[Case]:
    dtypes = DTYPE_SETS[shape_set] if dtypes is None else dtypes
    return [
        Case(op, direction, shape, dim, DTYPES[d])
        for op in ops
        for direction in directions
        for d in dtypes
        for shape, dim in (CROSS_ENTROPY_SHAPES if op == "cross_entropy" else SHAPE_SETS)[shape_set]
    ]


def make_input(case: Case, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """Normal values with standard deviation 4, every 8th row shifted by +1000; contiguous,
    with the reduced dim where ``case.dim`` says. Never zeros."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(case.rows, case.n, generator=gen) * 4
    rows[::LARGE_ROW_EVERY] += LARGE_OFFSET
    # Rows are laid out along case.dim: build (other dims..., n), then move n into place.
    other = [s for i, s in enumerate(case.shape) if i != case.dim % len(case.shape)]
    x = rows.reshape(*other, case.n).movedim(-1, case.dim)
    return x.to(device=device, dtype=case.dtype).contiguous()


def make_target(case: Case, device: torch.device | str, seed: int = 2) -> torch.Tensor | None:
    """Class targets of a cross-entropy case (one per row), else None."""
    if case.op != "cross_entropy":
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, case.n, (case.rows,), generator=gen).to(device)


def output_shape(case: Case) -> tuple[int, ...]:
    if case.op in ("logsumexp", "cross_entropy"):
        return tuple(s for i, s in enumerate(case.shape) if i != case.dim % len(case.shape))
    return case.shape


def make_grad(case: Case, device: torch.device | str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(output_shape(case), generator=gen).to(device=device, dtype=case.dtype)


def reference(
    case: Case, x: torch.Tensor, dy: torch.Tensor | None, target: torch.Tensor | None = None
) -> torch.Tensor:
    """The float64 value the case's output should have: the op's output (forward) or the
    gradient with respect to x (backward), computed by torch in float64. Cross-entropy:
    the per-row losses (reduction "none").

    The backward of softmax and log_softmax receives the forward output y stored in the
    case's dtype, and its gradient is a function of y alone, so its reference is the float64
    backward applied to the correctly rounded y: the best any backward can do from what it
    is given. (From exact y, a bf16 log_softmax backward would be charged with the rounding
    of y times sum(dy), about 0.2 at 32k columns, which no kernel can avoid.) logsumexp and
    cross-entropy keep the exact gradient: their backward can read x itself."""
    fn = {
        "softmax": torch.softmax,
        "log_softmax": torch.log_softmax,
        "logsumexp": torch.logsumexp,
        "cross_entropy": lambda t, dim: torch.nn.functional.cross_entropy(
            t, target, reduction="none"
        ),
    }[case.op]
    x64 = x.detach().double()
    if case.direction == "forward":
        return fn(x64, case.dim)
    if case.op in ("softmax", "log_softmax"):
        y = fn(x64, case.dim).to(case.dtype).double()
        backward = (
            torch._softmax_backward_data
            if case.op == "softmax"
            else torch._log_softmax_backward_data
        )
        return backward(dy.double(), y, case.dim, torch.float64)
    x64.requires_grad_()
    (dx,) = torch.autograd.grad(fn(x64, case.dim), x64, dy.double())
    return dx


# Tolerances of the correctness check: |out - ref| <= ATOL + RTOL * |ref| elementwise.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def check(case: Case, out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    """(correct, a short note): NaN/inf where the reference is finite, else the worst
    error in units of the tolerance."""
    out = out.detach().double()
    bad_values = ~torch.isfinite(out) & torch.isfinite(ref)
    if bad_values.any():
        kinds = "NaN" if out[bad_values].isnan().any() else "inf"
        return False, f"{kinds} in {int(bad_values.sum())} values"
    atol, rtol = TOLERANCE[case.dtype]
    err = ((out - ref).abs() / (atol + rtol * ref.abs())).nan_to_num(0.0).max().item()
    return err <= 1.0, f"err {err:.2f} tol" if err > 1.0 else "ok"
