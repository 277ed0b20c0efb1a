"""What the benchmark scripts share: interleaved timing, medians, and verdict lines.

The scripts run on shared, noisy machines, so every comparison is made inside one
process: the candidates are timed in rounds, interleaved (the order rotating each round),
and only medians and same-run ratios are reported. Each target ends as one line,
`[met] ...` or `[MISSED] ...`, which `run_all.py` collects.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import optax


def nnx_or_none() -> Any:
    """`flax.nnx`, or `None` (with a printed note) when flax is not installed: flax is a
    benchmark-only extra, and the scripts run without it."""
    try:
        from flax import nnx
    except ImportError:
        print("note: flax is not installed; the flax.nnx baseline is skipped")
        return None
    return nnx


def environment() -> str:
    """One line naming the machine and the versions the numbers come from."""
    try:
        import flax

        flax_version = f", flax {flax.__version__}"
    except ImportError:
        flax_version = ""
    device = jax.devices()[0]
    where = f"{device.platform} ({device.device_kind})"
    if device.platform == "cpu":
        where = f"CPU ({_cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
    return (
        f"{where}; Python {platform.python_version()}, jax {jax.__version__}, equinox "
        f"{eqx.__version__}, optax {optax.__version__}{flax_version}"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, `rounds` samples each, the functions called in
    turn in a rotating order so that the machine's drift affects them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def spread(samples: list[float], per: int = 1) -> str:
    """The interquartile range in ms (of `sample / per`), to show how noisy a median is."""
    if len(samples) < 4:
        return ""
    q = statistics.quantiles(samples, n=4)
    return f"[{q[0] / per * 1e3:.3g}-{q[2] / per * 1e3:.3g} ms]"


class Verdicts:
    """Collects and prints one `[met]` / `[MISSED]` line per target; in a smoke run
    (`--tiny`: tiny sizes, few repeats) `[smoke]`, since its timings mean nothing."""

    def __init__(self, *, smoke: bool = False) -> None:
        self.smoke = smoke
        self.results: list[tuple[str, bool]] = []

    def check(self, target: str, ok: bool, measured: str) -> bool:
        tag = "smoke" if self.smoke else ("met" if ok else "MISSED")
        line = f"[{tag}] {target}: {measured}"
        self.results.append((line, ok))
        print(line)
        return ok


def header(title: str) -> None:
    print(f"== {title}")
    print(environment())
    sys.stdout.flush()
