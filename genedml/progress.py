"""Progress for long stages (extraction, training) and the logging setup of the command line.

On a terminal, rich bars. When stderr is a file or a pipe (batch jobs, `2> log`), bars would only appear at
the end, cut to 80 columns, so each stage logs one complete line at a time instead: per epoch for training
(at most one line every LINE_EVERY_S seconds, the last epoch always), per sample and every ~30 s for
extraction.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
log = logging.getLogger("genedml")

LINE_EVERY_S = 2.0  # fit: at most one epoch line per this many seconds when not on a terminal
EXTRACT_LINE_EVERY_S = 30.0  # extract: a line per sample and at least this often within a sample


class _StderrHandler(logging.StreamHandler):
    """A plain handler writing to whatever sys.stderr is at the time (pytest and CliRunner swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def interactive() -> bool:
    """True when stderr is a terminal (rich bars); False for log files and pipes (one line per step)."""
    return console.is_terminal


def setup_logging(verbose: bool = False) -> None:
    """Route the "genedml" logger, and Python warnings, through rich on a terminal or plain lines elsewhere.

    Python `warnings` (third-party libraries') become one-line log records of "py.warnings", so the user sees
    one format, not raw `UserWarning` lines with source excerpts. Idempotent.
    """
    handler: logging.Handler = (
        RichHandler(console=console, show_path=False, show_time=False, markup=False) if interactive() else _StderrHandler()
    )
    handler._genedml = True  # type: ignore[attr-defined]
    console.soft_wrap = not interactive()  # complete lines in log files, not cut at 80 columns
    warnings.showwarning = _log_warning  # as logging.captureWarnings(True), in one line without the source excerpt
    for name, level in (("genedml", logging.DEBUG if verbose else logging.INFO), ("py.warnings", logging.WARNING)):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_genedml", False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def _log_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message, Path(filename).name, lineno)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class ExtractionProgress:
    """Overall bar in spots and a per-sample bar in encoded tiles, with spots/s and tiles/s (or log lines)."""

    def __init__(self, bars: bool | None = None) -> None:
        self.bars = interactive() if bars is None else bars
        self.bar = _progress() if self.bars else None
        self.overall: Any = None
        self.current: Any = None
        self.spots_done = 0
        self.total_spots = 0
        self.sample_id = ""
        self.tiles = self.total_tiles = 0
        self.sample_start = self.last_line = 0.0

    def __enter__(self) -> "ExtractionProgress":
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, total_spots: int) -> None:
        self.total_spots = total_spots
        if self.bar is not None:
            self.overall = self.bar.add_task("all samples (spots)", total=total_spots, rate="")
        else:
            log.info("extract: %d spots to encode", total_spots)

    def sample(self, sample_id: str, total_tiles: int) -> None:
        self.sample_id, self.tiles, self.total_tiles = sample_id, 0, total_tiles
        self.sample_start = self.last_line = time.perf_counter()
        if self.bar is not None:
            self.current = self.bar.add_task(f"  {sample_id} (tiles)", total=total_tiles, rate="")

    def advance(self, n_tiles: int) -> None:
        self.tiles += n_tiles
        if self.bar is None:
            now = time.perf_counter()
            if now - self.last_line >= EXTRACT_LINE_EVERY_S:
                self.last_line = now
                rate = self.tiles / max(now - self.sample_start, 1e-9)
                log.info("extract %s: %d/%d tiles (%.1f tiles/s); %d/%d spots done before this sample",
                         self.sample_id, self.tiles, self.total_tiles, rate, self.spots_done, self.total_spots)
        elif self.current is not None:
            self.bar.advance(self.current, n_tiles)
            task = self.bar.tasks[self.current]
            if task.elapsed:
                self.bar.update(self.current, rate=f"{task.completed / task.elapsed:.1f} tiles/s")

    def sample_done(self, report: Any) -> None:
        self.spots_done += report.spots
        rate = f"{report.spots / report.seconds:.1f} spots/s" if report.seconds else report.status
        if self.bar is None:
            log.info("extract %s: %s, %d spots (%s); %d/%d spots", report.sample_id, report.status, report.spots, rate,
                     self.spots_done, self.total_spots)
            return
        self.bar.update(self.overall, completed=self.spots_done, rate=rate)
        if self.current is not None:
            self.bar.update(self.current, completed=self.bar.tasks[self.current].total)
            self.current = None


class EpochProgress:
    """One bar over epochs showing the loss parts and the validation PCC (or one log line per epoch)."""

    def __init__(self, total_epochs: int, label: str = "fit", bars: bool | None = None) -> None:
        self.bars = interactive() if bars is None else bars
        self.bar = _progress() if self.bars else None
        self.total = total_epochs
        self.label = label
        self.task: Any = None
        self.start = self.last_line = 0.0
        self.pending: str | None = None  # the latest epoch line not yet logged (throttled)

    def __enter__(self) -> "EpochProgress":
        self.start = time.perf_counter()
        self.last_line = -float("inf")
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, rate="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.pending is not None:
            log.info("%s", self.pending)  # the last epoch is always shown

    def __call__(self, epoch: int, parts: dict[str, float], val_pcc: float | None) -> None:
        text = " ".join(f"{k}={v:.3f}" for k, v in parts.items())
        if val_pcc is not None:
            text += f" val_pcc={val_pcc:.3f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=epoch + 1, rate=text)
            return
        now = time.perf_counter()
        self.pending = f"{self.label} epoch {epoch + 1}/{self.total}: {text} ({now - self.start:.1f}s)"
        if now - self.last_line >= LINE_EVERY_S:
            log.info("%s", self.pending)
            self.last_line, self.pending = now, None
