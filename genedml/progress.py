"""Rich progress bars for long stages (extraction, training); silent objects for library use."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    """Route the "genedml" logger through rich (idempotent)."""
    logger = logging.getLogger("genedml")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


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
    """Overall bar in spots and a per-sample bar in encoded tiles, with spots/s and tiles/s."""

    def __init__(self) -> None:
        self.bar = _progress()
        self.overall: Any = None
        self.current: Any = None
        self.spots_done = 0

    def __enter__(self) -> "ExtractionProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def start(self, total_spots: int) -> None:
        self.overall = self.bar.add_task("all samples (spots)", total=total_spots, rate="")

    def sample(self, sample_id: str, total_tiles: int) -> None:
        self.current = self.bar.add_task(f"  {sample_id} (tiles)", total=total_tiles, rate="")

    def advance(self, n_tiles: int) -> None:
        if self.current is not None:
            self.bar.advance(self.current, n_tiles)
            task = self.bar.tasks[self.current]
            if task.elapsed:
                self.bar.update(self.current, rate=f"{task.completed / task.elapsed:.1f} tiles/s")

    def sample_done(self, report: Any) -> None:
        self.spots_done += report.spots
        rate = f"{report.spots / report.seconds:.1f} spots/s" if report.seconds else report.status
        self.bar.update(self.overall, completed=self.spots_done, rate=rate)
        if self.current is not None:
            self.bar.update(self.current, completed=self.bar.tasks[self.current].total)
            self.current = None


class EpochProgress:
    """One bar over epochs showing the loss parts and the validation PCC."""

    def __init__(self, total_epochs: int, label: str = "fit") -> None:
        self.bar = _progress()
        self.total = total_epochs
        self.label = label
        self.task: Any = None

    def __enter__(self) -> "EpochProgress":
        self.bar.__enter__()
        self.task = self.bar.add_task(self.label, total=self.total, rate="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, epoch: int, parts: dict[str, float], val_pcc: float | None) -> None:
        text = " ".join(f"{k}={v:.3f}" for k, v in parts.items())
        if val_pcc is not None:
            text += f" val_pcc={val_pcc:.3f}"
        self.bar.update(self.task, completed=epoch + 1, rate=text)
