"""Live console progress: step, pairs/s, tokens/s, staleness, held-out correction rate, ETA.

A ``MetricSink`` (it sits in the driver's ``MultiSink`` next to the JSONL and W&B sinks), so it
sees exactly the dicts the other sinks record and computes nothing the run does not log, except
the rates and the ETA, which need a clock.

Two renderings of the same ``ProgressState``:

* ``live`` (a terminal): a ``rich`` progress bar that stays at the bottom, updated every step,
  with one line printed above it every ``every`` steps, so the scrollback keeps the history;
* ``lines`` (stdout is a file or a pipe: CI logs, ``nohup``, Ray job logs): plain lines only —
  no cursor movement or colour codes that turn a log file into noise.

``rich`` is imported only when the live display starts.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, TextIO

STALENESS_KEYS = ("buffer/batch_staleness_mean", "buffer/last_batch_staleness_mean")
HELD_OUT_KEY = "eval/greedy/correction_rate"
EVAL_FIELDS = (("accuracy", "acc"), ("correction_rate", "corr"), ("mean_edit_distance", "edit"), ("kl", "KL"))


@dataclass(frozen=True)
class ProgressState:
    """What the display shows after one ``log`` call (None: not known yet)."""

    step: int
    total_steps: int
    loss: float | None
    margin: float | None
    pairs_per_s: float | None
    tokens_per_s: float | None
    staleness: float | None
    held_out_correction_rate: float | None
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps > 0 else 0.0

    def fields(self) -> list[str]:
        """``name value`` cells for the quantities known so far."""
        cells = []
        for label, value, fmt in (
            ("loss", self.loss, ".4f"),
            ("margin", self.margin, ".3f"),
            ("pairs/s", self.pairs_per_s, ".1f"),
            ("tok/s", self.tokens_per_s, ".0f"),
            ("staleness", self.staleness, ".2f"),
            ("held-out corr", self.held_out_correction_rate, ".3f"),
        ):
            if value is not None:
                cells.append(f"{label} {format(value, fmt)}")
        return cells


def format_eta(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class ProgressTracker:
    """Turns the logged dicts into a ``ProgressState``: keeps the last held-out correction rate
    (evaluation runs only every ``eval.every_steps``), counts pairs, and times the steps.

    Rates and ETA are measured from the first ``log`` call (the drivers log the evaluation
    before training there, so that is when training starts; a resumed run starts its clock at
    its first step). ``system/pairs_per_s`` (the Ray driver's count over every learner rank) is
    preferred to the tracker's own count of ``train/num_pairs``, which is rank 0's share there.
    """

    def __init__(self, total_steps: int, clock: Callable[[], float] = time.monotonic):
        self.total_steps = int(total_steps)
        self.clock = clock
        self.t0: float | None = None
        self.step0 = 0
        self.pairs = 0.0
        self.held_out: float | None = None
        self.last: dict[str, float | None] = {}

    def update(self, metrics: dict[str, float], step: int) -> ProgressState:
        now = self.clock()
        first = self.t0 is None
        if first:  # the clock starts here: this call's own step and pairs were made before it
            self.t0, self.step0 = now, step
        elapsed = max(now - self.t0, 1e-9)
        if not first:
            self.pairs += _finite(metrics.get("train/num_pairs")) or 0.0
        held = _finite(metrics.get(HELD_OUT_KEY))
        self.held_out = held if held is not None else self.held_out
        for key in ("train/loss", "train/margin"):
            if key in metrics:
                self.last[key] = _finite(metrics[key])
        pairs_per_s = _finite(metrics.get("system/pairs_per_s"))
        if pairs_per_s is None and self.pairs:
            pairs_per_s = self.pairs / elapsed
        staleness = next((_finite(metrics[k]) for k in STALENESS_KEYS if k in metrics), None)
        if staleness is not None:
            self.last["staleness"] = staleness
        tokens = _finite(metrics.get("rollout/tokens_per_s"))
        if tokens is None:
            worker_tokens = [v for k, v in metrics.items() if k.startswith("rollout/worker") and k.endswith("/tokens")]
            tokens = sum(map(float, worker_tokens)) / elapsed if worker_tokens else None
        if tokens is not None:
            self.last["tokens"] = tokens
        done = step - self.step0
        eta = (self.total_steps - step) * elapsed / done if done > 0 else None
        return ProgressState(
            step=step,
            total_steps=self.total_steps,
            loss=self.last.get("train/loss"),
            margin=self.last.get("train/margin"),
            pairs_per_s=pairs_per_s,
            tokens_per_s=self.last.get("tokens"),
            staleness=self.last.get("staleness"),
            held_out_correction_rate=self.held_out,
            eta_s=eta,
        )


def progress_line(state: ProgressState) -> str:
    """The plain-text line: ``step 3/50 (6%) | loss 0.6931 | ... | ETA 1m23s``."""
    head = f"step {state.step}/{state.total_steps} ({state.fraction:.0%})"
    return " | ".join([head, *state.fields(), f"ETA {format_eta(state.eta_s)}"])


def eval_line(metrics: dict[str, float], step: int) -> str | None:
    """``eval step 0 | greedy acc 0.220 corr 0.780 edit 1.395 | sampled ...`` when ``metrics``
    holds a held-out evaluation, else None."""
    modes = []
    for mode in ("greedy", "sampled"):
        cells = [f"{short} {metrics[f'eval/{mode}/{name}']:.3f}" for name, short in EVAL_FIELDS
                 if _finite(metrics.get(f"eval/{mode}/{name}")) is not None]
        if cells:
            modes.append(f"{mode} " + " ".join(cells))
    return " | ".join([f"eval step {step}", *modes]) if modes else None


class ProgressSink:
    """The console ``MetricSink``: a live bar on a terminal, plain lines otherwise.

    ``mode="auto"`` picks ``live`` when ``stream`` (default stdout) is a terminal. Lines (train
    progress every ``every`` steps, and every held-out evaluation) are printed in both modes.
    """

    def __init__(
        self,
        total_steps: int,
        every: int = 1,
        stream: TextIO | None = None,
        mode: Literal["auto", "live", "lines"] = "auto",
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in ("auto", "live", "lines"):
            raise ValueError(f"metrics.progress must be auto, live or lines, got {mode!r}")
        self.stream = stream
        self.every = max(1, int(every))
        self.tracker = ProgressTracker(total_steps, clock)
        out = stream or sys.stdout
        self.live = mode == "live" or (mode == "auto" and _isatty(out))
        self._progress: Any = None
        self._task: Any = None

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(file=self.stream or sys.stdout, force_terminal=True)
        self._progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=30),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[stats]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            auto_refresh=False,  # no refresh thread: the driver's log calls drive the display
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.tracker.total_steps, stats="", eta="?")

    def _print(self, line: str) -> None:
        if self.live:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream or sys.stdout, flush=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        state = self.tracker.update(metrics, step)
        if self.live and self._progress is None:
            self._start_live()
        evaluated = eval_line(metrics, step)
        if evaluated:
            self._print(evaluated)
        if "train/loss" in metrics and step % self.every == 0:
            self._print(progress_line(state))
        if self.live:
            self._progress.update(self._task, completed=min(step, self.tracker.total_steps),
                                  stats=" | ".join(state.fields()), eta=format_eta(state.eta_s), refresh=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
