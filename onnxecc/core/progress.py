"""Progress of a long run as plain lines, for logs: CI jobs and deployment pipelines see no progress bar.

`LogLines` turns the events of `compress` (and of `sweep`, which passes them on) into one line per phase and
per epoch, and one at most every `LINE_EVERY_S` seconds within a long epoch, each with the time elapsed since
the run started and an estimate of the training time left. The estimate counts epochs: `compress` announces
the epochs a round will train ("plan"), and the time per epoch so far, partial epochs included, gives the rest.
The front end decides where lines go (the CLI: stderr, when that is not a terminal; a terminal gets the bar).

Lines are held back until the run is past checking its input — the first training batch or epoch, a counted
job's second report, or `flush()` when the run succeeded — so that a refused input still prints one line only.

Why: an 11-minute `compress` of the PaddleOCR classifier wrote nothing to a pipeline's log between its first
line and its final table.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LINE_EVERY_S = 30.0  # at most this long without a line while an epoch (or a profile) runs


def clock_text(seconds: float) -> str:
    """h:mm:ss."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def describe_recovery(record: dict) -> str:
    """One line for a recovery record of `onnxecc.train.guard` (also a "recovery" event)."""
    at = f", epoch {record['epoch']} step {record['step']}" if "step" in record else ""
    then = f"; learning rate now {record['lr']:.3g}" if "lr" in record else f"; {record.get('action', '')}"
    return f"recovered in {record['during']}{at}: non-finite {record['non_finite']}{then}"


class LogLines:
    """Call it with `compress`'s events (`on_event(kind, info)`); it calls `write(line)` (see the module docstring).

    Events read: "plan" (epochs: what this round trains), "stage" (name), "epoch" (epoch, epochs, loss,
    train_accuracy, seconds, phase), "batch" (step, total, epochs), "recovery" (a `onnxecc.train.guard` record);
    others are ignored. `count(label, done, total)` reports a counted job (profiling's variants) the same way."""

    def __init__(self, write: Callable[[str], None], every_s: float = LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.every_s, self.clock = write, every_s, clock
        self.start = self.last = clock()
        self.stage = ""
        self.planned: float | None = None  # epochs this round trains
        self.plan_start = self.start
        self.completed = 0  # epochs finished since the plan
        self.partial = 0.0  # share of the running epoch done (from batch events)
        self.count_start: float | None = None
        self.held: list[str] | None = []  # lines not written yet (see the module docstring); None: write at once
        self.count_first = 0

    def __call__(self, kind: str, info: dict) -> None:
        now = self.clock()
        if kind in ("batch", "epoch", "recovery"):  # training runs: the input was accepted
            self.flush()
        if kind == "plan":
            self.planned, self.plan_start, self.completed, self.partial = float(info["epochs"]), now, 0, 0.0
        elif kind == "stage":
            self.stage = info["name"]
            self._line(now, self.stage)
        elif kind == "epoch":
            self.completed, self.partial = self.completed + 1, 0.0
            acc = info.get("train_accuracy")
            of = f"/{info['epochs']}" if info.get("epochs") else ""
            self._line(now, f"{self._phase(info)}: epoch {info['epoch']}{of}, loss {info['loss']:.4f}"
                       + (f", train acc {acc:.3f}" if acc is not None else "") + f" ({info['seconds']:.1f} s)")
        elif kind == "batch":
            per_epoch = info["total"] / info["epochs"] if info.get("epochs") else None
            if per_epoch:
                self.partial = (info["step"] % per_epoch) / per_epoch
            if now - self.last >= self.every_s:
                where = (f"epoch {int(info['step'] // per_epoch) + 1}/{info['epochs']}, "
                         f"batch {int(info['step'] % per_epoch) or int(per_epoch)}/{int(per_epoch)}"
                         if per_epoch else f"batch {info['step']}/{info['total']}")
                self._line(now, f"{self._phase(info)}: {where}")
        elif kind == "recovery":
            self._line(now, describe_recovery(info))

    def count(self, label: str, done: int, total: int | None) -> None:
        """A counted job's progress: a line at its first report, at its end, and every `every_s` between."""
        now = self.clock()
        if self.count_start is None:  # a resumed job starts with some done: the rate counts this run's only
            self.count_start, self.count_first = now, done
        elif done != total and now - self.last < self.every_s:
            return
        else:
            self.flush()
        left, here = "", done - self.count_first
        if total and here > 0 and done < total:
            left = f"; ~{clock_text((now - self.count_start) / here * (total - done))} left"
        self._line(now, f"{label}: {done}/{total if total else '?'}{left}", estimate=False)

    def flush(self) -> None:
        """Write the lines held back so far, and every later one at once."""
        held, self.held = self.held or [], None
        for line in held:
            self.write(line)

    def _phase(self, info: dict) -> str:
        phase = info.get("phase")
        return phase if phase and phase != "training" else self.stage

    def left_s(self, now: float) -> float | None:
        """Training time left in this round: seconds per epoch so far times the epochs still to train."""
        done = self.completed + self.partial
        if self.planned is None or done <= 0 or done >= self.planned:
            return None
        return (now - self.plan_start) / done * (self.planned - done)

    def _line(self, now: float, text: str, estimate: bool = True) -> None:
        left = self.left_s(now) if estimate else None
        line = f"[{clock_text(now - self.start)}] {text}" + (f"; training ~{clock_text(left)} left" if left else "")
        if self.held is not None:
            self.held.append(line)
        else:
            self.write(line)
        self.last = now
