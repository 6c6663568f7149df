"""How results are shown: the printed table, CSV and JSON files, PNG plots (GB/s against row
length, one line per provider, the roof drawn), and the record of the run."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from collections import defaultdict

from .runner import RoofLog, Row


def _num(value: float, fmt: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, fmt)
    )


def table(rows: list[Row]) -> str:
    header = [
        "op",
        "dir",
        "shape",
        "dtype",
        "provider",
        "median us",
        "p20-p80 us",
        "GB/s",
        "of roof",
        "x torch",
        "x compile",
        "1st call s",
        "peak MiB",
        "correct",
    ]
    lines = []
    for r in rows:
        correct = "ok" if r.correct else (r.note or "no")
        lines.append(
            [
                r.op,
                "fwd" if r.direction == "forward" else "bwd",
                r.shape,
                r.dtype,
                r.provider,
                _num(r.median_us, ",.1f"),
                f"{_num(r.p20_us, ',.1f')}-{_num(r.p80_us, ',.1f')}",
                _num(r.gbs, ",.2f"),
                _num(r.roof_fraction * 100, ".0f") + "%"
                if not math.isnan(r.roof_fraction)
                else "-",
                _num(r.speedup_vs_torch, ".2f"),
                _num(r.speedup_vs_compile, ".2f"),
                _num(r.first_call_s, ".2f"),
                _num(r.peak_mem_mib, ",.1f"),
                correct,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    previous = None
    for line in lines:
        key = tuple(line[:4])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return "\n".join(out)


def machine_description(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA ATen runs
        "threads": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class ResultsCsv:
    """results.csv, written as the run goes: the header when opened, each case's rows as soon
    as they are measured, flushed, so a run that crashes or is killed keeps every finished
    row."""

    def __init__(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "results.csv")
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 - closed by close()
        self._writer = csv.DictWriter(self._file, fieldnames=list(Row.__dataclass_fields__))
        self._writer.writeheader()
        self._file.flush()

    def append(self, rows: list[Row]) -> None:
        for r in rows:
            self._writer.writerow(r.as_dict())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_files(out_dir: str, rows: list[Row], roofs: RoofLog, meta: dict) -> list[str]:
    """results.json, table.txt and command.txt (results.csv is written as the run goes:
    :class:`ResultsCsv`)."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(
            {
                "meta": meta,
                "roofs_gbs": {
                    "copy": roofs.summary().copy / 1e9,
                    "read": roofs.summary().read / 1e9,
                    "measured": [[r.copy / 1e9, r.read / 1e9] for r in roofs.measured],
                },
                "rows": [r.as_dict() for r in rows],
            },
            f,
            indent=1,
            default=str,
        )
    written.append(path)
    path = os.path.join(out_dir, "table.txt")
    with open(path, "w") as f:
        f.write(table(rows) + "\n")
    written.append(path)
    path = os.path.join(out_dir, "command.txt")
    with open(path, "w") as f:
        for key, value in meta.items():
            f.write(f"{key}: {value}\n")
        f.write(f"roofs (timed beside each case's providers): {roofs.span()}\n")
    written.append(path)
    return written


def plot(out_dir: str, rows: list[Row], roofs: RoofLog, title_suffix: str) -> list[str]:
    """One PNG per op x direction x dtype: GB/s against row length (dim=-1 shapes), one line
    per provider; incorrect outputs drawn as crosses; the roof dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for r in rows:
        if "dim=" not in r.shape:
            groups[(r.op, r.direction, r.dtype)].append(r)
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    written = []
    for (op, direction, dtype), group in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        by_provider: dict[str, list[Row]] = defaultdict(list)
        for r in group:
            by_provider[r.provider].append(r)
        for provider, all_points in by_provider.items():
            all_points.sort(key=lambda r: r.n)
            points = [p for p in all_points if not math.isnan(p.gbs)]
            failed = [p for p in all_points if math.isnan(p.gbs)]
            if failed:  # an error is a result: drawn at 0 GB/s, named in the legend
                ax.plot(
                    [p.n for p in failed],
                    [0.0] * len(failed),
                    "s",
                    color="black",
                    markersize=8,
                    label=f"{provider}: error at N = {', '.join(str(p.n) for p in failed)}",
                )
            if not points:
                continue
            ax.plot([p.n for p in points], [p.gbs for p in points], marker="o", label=provider)
            bad = [p for p in points if not p.correct]
            if bad:
                ax.plot(
                    [p.n for p in bad], [p.gbs for p in bad], "x", color="red", markersize=10, mew=2
                )
        read_only = op == "logsumexp" and direction == "forward"
        summary = roofs.summary()  # the median over the run
        roof = (summary.read if read_only else summary.copy) / 1e9
        ax.axhline(
            roof,
            linestyle="--",
            color="gray",
            label=f"{'read' if read_only else 'copy'} roof {roof:,.1f} GB/s",
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("row length N")
        ax.set_ylabel("GB/s (bytes the op must move)")
        ax.set_ylim(bottom=0)
        ax.set_title(
            f"{op} {direction}, {dtype}{title_suffix}\n(red x: output incorrect; "
            "black square at 0: the provider raised)"
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "plots", f"{op}-{direction}-{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
