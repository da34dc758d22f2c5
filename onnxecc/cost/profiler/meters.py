"""Meters: how one inference is measured on the target. One interface, one small class per source.

A meter turns "run the model once" (a zero-argument callable) into a `Measurement`: the median over
`repeats` of the metric per inference, and its inter-quartile range (the noise). Two kinds:

* `LatencyMeter` — wall clock around each `session.run` (seconds); `CpuTimeMeter` — CPU time of the calling
  thread instead (the latency a shared, busy machine would have alone; one intra-op thread only).
* energy meters (joules) — read an energy source before and after a *window* of N back-to-back runs and
  divide by N; N is chosen so that a window lasts at least `window_s`, long enough for the source's
  resolution. Counter sources implement `read()` (cumulative joules): `RaplMeter` (Linux powercap
  `energy_uj`, wrap-around at `max_energy_range_uj`), `NvmlMeter` (NVIDIA total-energy counter through
  nvidia-ml-py, imported lazily), `CmdMeter` (a user command that prints a cumulative energy reading in
  joules — any external power meter). `JetsonMeter` samples instantaneous power of INA3221 rails in sysfs
  on a background thread and integrates it over the window.

`make_meter("latency" | "cputime" | "rapl[:DOMAIN_DIR,...]" | "nvml[:INDEX]" | "jetson[:RAIL_FILE,...]" |
"cmd:COMMAND")` parses the `--meter` option; `reopen(profile.meter)` makes the meter a profile recorded again.
Only the standard library and numpy are used (the profiler runs on the target).
"""

from __future__ import annotations

import glob
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxecc.core.errors import UserError

Run = Callable[[], object]


@dataclass
class Measurement:
    """Median of the metric per inference over `repeats` measurements, with the inter-quartile range."""

    value: float
    iqr: float
    repeats: int
    runs_per_window: int = 1
    min: float | None = None  # the smallest measurement (least disturbed by other processes), for reference

    def as_dict(self) -> dict:
        return {"value": self.value, "iqr": self.iqr, "min": self.min, "repeats": self.repeats,
                "runs_per_window": self.runs_per_window}


def summarize(values, runs_per_window: int = 1) -> Measurement:
    values = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return Measurement(float(med), float(q3 - q1), int(values.size), runs_per_window, float(values.min()))


class Meter:
    """Measures one inference. Subclasses set `name`, `metric` ('latency' | 'energy') and `unit`."""

    name = "meter"
    metric = "latency"
    unit = "s"

    def __init__(self, spec: str):
        self.spec = spec

    def measure(self, run: Run, warmup: int, repeats: int) -> Measurement:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the profile JSON records about the meter."""
        return {"spec": self.spec, "name": self.name, "metric": self.metric, "unit": self.unit}

    def close(self) -> None:
        pass


class LatencyMeter(Meter):
    """Wall-clock seconds of each run (perf_counter), after `warmup` runs. At least `repeats` runs are timed,
    and more for a fast model until they span `min_time_s`, so that a short burst of another process on the
    machine spoils only a few of them (the median ignores those)."""

    name, metric, unit = "latency", "latency", "s"
    min_time_s = 0.05
    max_repeats = 2000

    def __init__(self, spec: str = "latency", clock: Callable[[], float] = time.perf_counter,
                 min_time_s: float | None = None):
        super().__init__(spec)
        self.clock = clock
        if min_time_s is not None:
            self.min_time_s = float(min_time_s)

    def measure(self, run: Run, warmup: int, repeats: int) -> Measurement:
        for _ in range(warmup):
            run()
        clock = self.clock
        times = []
        total = 0.0
        while len(times) < max(1, repeats) or (total < self.min_time_s and len(times) < self.max_repeats):
            start = clock()
            run()
            times.append(clock() - start)
            total += times[-1]
        return summarize(times)

    def describe(self) -> dict:
        return {**super().describe(), "min_time_s": self.min_time_s}


class CpuTimeMeter(LatencyMeter):
    """CPU seconds of the calling thread per run (`time.thread_time`): with one intra-op thread onnxruntime runs
    the model on the caller's thread, so on an idle device this is the latency, and on a shared machine it is
    what the latency would be without the other processes (preemption does not count). Needs --threads 1."""

    name = "cputime"

    def __init__(self, spec: str = "cputime", min_time_s: float | None = None):
        super().__init__(spec, clock=time.thread_time, min_time_s=min_time_s)


class EnergyMeter(Meter):
    """Joules per inference: energy of a window of N runs divided by N (median over `repeats` windows)."""

    metric, unit = "energy", "J"
    window_s = 0.05  # shortest window: long enough for the source's update rate and resolution

    def __init__(self, spec: str, window_s: float | None = None, clock: Callable[[], float] = time.perf_counter):
        super().__init__(spec)
        if window_s is not None:
            self.window_s = float(window_s)
        self.clock = clock

    # -- a window: begin() before the runs, end(state) after them -> joules in between
    def begin(self):
        return self.read()

    def end(self, state) -> float:
        return self.read() - state

    def read(self) -> float:
        """Cumulative energy in joules (counter sources)."""
        raise NotImplementedError

    def runs_per_window(self, run: Run) -> int:
        start = self.clock()
        run()
        once = max(self.clock() - start, 1e-7)
        return max(1, math.ceil(self.window_s / once))

    def window(self, run: Run, n: int) -> float:
        """Joules of n back-to-back runs."""
        state = self.begin()
        for _ in range(n):
            run()
        return self.end(state)

    def measure(self, run: Run, warmup: int, repeats: int) -> Measurement:
        for _ in range(warmup):
            run()
        n = self.runs_per_window(run)
        values = [self.window(run, n) / n for _ in range(max(1, repeats))]
        return summarize(values, n)

    def describe(self) -> dict:
        return {**super().describe(), "window_s": self.window_s}


# ---- RAPL -------------------------------------------------------------------------------------------------------
POWERCAP = "/sys/class/powercap"


class RaplMeter(EnergyMeter):
    """Linux powercap (RAPL) energy counters: `energy_uj` of each domain, wrapping at `max_energy_range_uj`.

    Default domains: the top-level zones under /sys/class/powercap (`intel-rapl:0`, `intel-rapl:1`, … — one
    per package; their sub-zones are parts of them and are not added again)."""

    name = "rapl"
    window_s = 0.02  # counters update about every millisecond

    def __init__(self, spec: str = "rapl", domains: list[str] | None = None, root: str = POWERCAP, **kw):
        super().__init__(spec, **kw)
        if not domains:
            domains = sorted(d for d in glob.glob(os.path.join(root, "*")) if re.search(r"-rapl:\d+$", d))
            if not domains:
                raise UserError(f"--meter rapl: no RAPL energy counters under {root} (this CPU or kernel does "
                                "not expose powercap; use --meter latency, or rapl:DIR for another location)")
        self.domains = [Path(d) for d in domains]
        self.max_uj = []
        for d in self.domains:
            if not (d / "energy_uj").exists():
                raise UserError(f"--meter rapl: {d} has no energy_uj counter")
            self.max_uj.append(_read_number(d / "max_energy_range_uj", "rapl") if (d / "max_energy_range_uj").exists()
                               else 2.0 ** 32)
        self.names = [(d / "name").read_text().strip() if (d / "name").exists() else d.name for d in self.domains]
        self._raw()  # fail now (permissions) rather than after the first sample

    def _raw(self) -> list[float]:
        return [_read_number(d / "energy_uj", "rapl") for d in self.domains]

    def begin(self):
        return self._raw()

    def end(self, state) -> float:
        total = 0.0
        for before, after, top in zip(state, self._raw(), self.max_uj):
            delta = after - before
            if delta < 0:  # the counter wrapped around (at most once per window: windows are short)
                delta += top
            total += delta
        return total * 1e-6

    def read(self) -> float:
        return sum(self._raw()) * 1e-6

    def describe(self) -> dict:
        return {**super().describe(), "domains": [str(d) for d in self.domains], "domain_names": self.names}


def _read_number(path: Path, meter: str) -> float:
    try:
        return float(Path(path).read_text().split()[0])
    except PermissionError as exc:
        raise UserError(f"--meter {meter}: cannot read {path} (permission denied): run as root or make it "
                        f"readable (sudo chmod a+r {path})") from exc
    except (OSError, ValueError, IndexError) as exc:
        raise UserError(f"--meter {meter}: cannot read a number from {path}: {exc}") from exc


# ---- NVML -------------------------------------------------------------------------------------------------------
class NvmlMeter(EnergyMeter):
    """NVIDIA GPU total energy counter (millijoules since driver load, Volta and newer) via nvidia-ml-py."""

    name = "nvml"
    window_s = 0.5  # the counter advances in coarse steps (about every 100 ms on recent drivers)

    def __init__(self, spec: str = "nvml", index: int = 0, **kw):
        super().__init__(spec, **kw)
        try:
            import pynvml
        except ImportError as exc:
            raise UserError("--meter nvml needs nvidia-ml-py: pip install nvidia-ml-py "
                            "(or use --meter latency)") from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # pynvml raises NVMLError subclasses (no driver, no GPU)
            raise UserError(f"--meter nvml: NVML cannot start ({exc}): no NVIDIA GPU or driver here") from exc
        try:
            count = pynvml.nvmlDeviceGetCount()
            if not 0 <= index < count:
                raise UserError(f"--meter nvml:{index}: there are {count} GPU(s) (indices 0..{count - 1})")
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.gpu = pynvml.nvmlDeviceGetName(self.handle)
            self.gpu = self.gpu.decode() if isinstance(self.gpu, bytes) else str(self.gpu)
            self.read()
        except UserError:
            pynvml.nvmlShutdown()
            raise
        except Exception as exc:
            pynvml.nvmlShutdown()
            raise UserError(f"--meter nvml: GPU {index} has no total-energy counter ({exc}); it needs a Volta "
                            "or newer GPU") from exc
        self.index = index

    def read(self) -> float:
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) * 1e-3

    def describe(self) -> dict:
        return {**super().describe(), "gpu": self.gpu, "index": self.index}

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # already shut down
            pass


# ---- Jetson (INA3221 power monitors) ----------------------------------------------------------------------------
JETSON_PATTERNS = (
    "/sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input",  # L4T ≤ 32: power in mW
    "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in[1-3]_input",  # L4T ≥ 34: bus voltage (mV) × current (mA)
)
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")  # board input: the other rails are parts of it


@dataclass
class Rail:
    """One power rail: a power file in mW, or a voltage (mV) and a current (mA) file."""

    label: str
    power: Path | None = None
    voltage: Path | None = None
    current: Path | None = None

    def milliwatts(self) -> float:
        if self.power is not None:
            return _read_number(self.power, "jetson")
        return _read_number(self.voltage, "jetson") * _read_number(self.current, "jetson") * 1e-3


def find_rails(paths: list[str] | None = None, patterns=JETSON_PATTERNS) -> list[Rail]:
    """Rails from explicit files (`in_powerN_input` power, or `inN_input` voltage with its `currN_input`), or
    discovered with `patterns`. Without explicit files, only the board-input rail is kept when one exists."""
    explicit = bool(paths)
    files = list(paths) if paths else sorted(f for p in patterns for f in glob.glob(p))
    rails = []
    for f in files:
        path = Path(f)
        m_power = re.fullmatch(r"in_power(\d+)_input", path.name)
        m_volt = re.fullmatch(r"in(\d+)_input", path.name)
        if m_power:
            label_file = path.with_name(f"rail_name_{m_power.group(1)}")
            label_file = label_file if label_file.exists() else path.with_name(f"in_rail_name{m_power.group(1)}")
            rails.append(Rail(_label(label_file, path), power=path))
        elif m_volt and path.with_name(f"curr{m_volt.group(1)}_input").exists():
            rails.append(Rail(_label(path.with_name(f"in{m_volt.group(1)}_label"), path), voltage=path,
                              current=path.with_name(f"curr{m_volt.group(1)}_input")))
        elif explicit:
            raise UserError(f"--meter jetson: {f} is neither a power file (in_powerN_input, mW) nor a voltage file "
                            "(inN_input, mV) with a currN_input next to it")
    if not rails:
        raise UserError("--meter jetson: no INA3221 power rails found in sysfs (not a Jetson?); name the rail "
                        "files with jetson:FILE,FILE")
    if not explicit:
        total = [r for r in rails if r.label.upper() in TOTAL_RAILS]
        rails = total[:1] or rails
    return rails


def _label(label_file: Path, fallback: Path) -> str:
    try:
        return label_file.read_text().strip()
    except OSError:
        return fallback.name


class JetsonMeter(EnergyMeter):
    """Instantaneous power of INA3221 rails (mW), sampled every `interval_s` on a background thread during the
    window and integrated over time (trapezoids, from the window's start to its end)."""

    name = "jetson"
    window_s = 0.2

    def __init__(self, spec: str = "jetson", rails: list[Rail] | None = None, interval_s: float = 0.005,
                 paths: list[str] | None = None, **kw):
        super().__init__(spec, **kw)
        self.rails = rails if rails is not None else find_rails(paths)
        self.interval_s = float(interval_s)
        self.power_w()

    def power_w(self) -> float:
        return sum(r.milliwatts() for r in self.rails) * 1e-3

    def begin(self):
        samples: list[tuple[float, float]] = [(self.clock(), self.power_w())]
        stop = threading.Event()

        def sample():
            while not stop.wait(self.interval_s):
                samples.append((self.clock(), self.power_w()))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        return samples, stop, thread

    def end(self, state) -> float:
        samples, stop, thread = state
        stop.set()
        thread.join()
        samples.append((self.clock(), self.power_w()))
        return integrate(samples)

    def describe(self) -> dict:
        return {**super().describe(), "interval_s": self.interval_s,
                "rails": [{"label": r.label, "files": [str(p) for p in (r.power, r.voltage, r.current) if p]}
                          for r in self.rails]}


def integrate(samples: list[tuple[float, float]]) -> float:
    """∫ P dt (joules) of (time s, power W) samples by trapezoids."""
    if len(samples) < 2:
        return 0.0
    t = np.array([s[0] for s in samples], dtype=np.float64)
    p = np.array([s[1] for s in samples], dtype=np.float64)
    return float(np.sum((t[1:] - t[:-1]) * (p[1:] + p[:-1]) * 0.5))


# ---- external command -------------------------------------------------------------------------------------------
class CmdMeter(EnergyMeter):
    """A user command that prints a cumulative energy reading in joules (its last number on stdout): run before
    and after each window, the difference is the window's energy. Wrap any external power meter this way."""

    name = "cmd"
    window_s = 0.5

    def __init__(self, spec: str, command: str, timeout_s: float = 30.0, **kw):
        super().__init__(spec, **kw)
        if not command.strip():
            raise UserError('--meter cmd:"COMMAND" needs a command that prints joules')
        self.command = command
        self.timeout_s = timeout_s
        self.read()

    def read(self) -> float:
        try:
            proc = subprocess.run(self.command, shell=True, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise UserError(f"--meter cmd: the command did not finish in {self.timeout_s:g} s: "
                            f"{self.command}") from exc
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            raise UserError(f"--meter cmd: the command exited with {proc.returncode}: {self.command}"
                            + (f" ({last})" if last else ""))
        numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", proc.stdout)
        if not numbers:
            raise UserError(f"--meter cmd: the command printed no number (joules expected): {self.command}")
        return float(numbers[-1])

    def describe(self) -> dict:
        return {**super().describe(), "command": self.command}


# ---- the --meter option -----------------------------------------------------------------------------------------
METERS = ("latency", "cputime", "rapl", "nvml", "jetson", "cmd")


def make_meter(spec: str | Meter | None) -> Meter:
    """Parse `--meter`: latency | cputime | rapl[:DIR,...] | nvml[:INDEX] | jetson[:FILE,...] | cmd:COMMAND."""
    if isinstance(spec, Meter):
        return spec
    text = (spec or "latency").strip()
    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "latency" and not arg:
        return LatencyMeter(text)
    if kind == "cputime" and not arg:
        return CpuTimeMeter(text)
    if kind == "rapl":
        return RaplMeter(text, domains=_list(arg))
    if kind == "nvml":
        try:
            index = int(arg) if arg else 0
        except ValueError:
            raise UserError(f"--meter {text}: the GPU index must be an integer (nvml:0)") from None
        return NvmlMeter(text, index=index)
    if kind == "jetson":
        return JetsonMeter(text, paths=_list(arg))
    if kind == "cmd":
        command = arg
        if len(command) >= 2 and command[0] == command[-1] and command[0] in "\"'":
            command = command[1:-1]
        return CmdMeter(text, command)
    raise UserError(f"unknown --meter {text!r}: use latency, cputime, rapl, nvml, jetson or cmd:\"COMMAND\"")


def reopen(description: dict) -> Meter:
    """The meter a profile was measured with, from its `describe()` record (the profile's `meter`, copied into a
    compressed model's metadata): the same --meter spec and, for energy, the same window, so that measuring a
    model later is comparable with what the profile measured. Raises `make_meter`'s UserError when the meter
    cannot run here (no RAPL counters, no NVML, a command that fails)."""
    spec = description.get("spec") if isinstance(description, dict) else None
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"the recorded meter {description!r} names no --meter spec: re-run `onnxecc profile`")
    meter = make_meter(spec)
    window = description.get("window_s")
    if isinstance(meter, EnergyMeter) and isinstance(window, (int, float)) and window >= 0:
        meter.window_s = float(window)
    return meter


def _list(arg: str) -> list[str] | None:
    items = [a.strip() for a in arg.split(",") if a.strip()]
    return items or None
