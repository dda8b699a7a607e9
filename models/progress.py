"""What the training loop reports: ``metrics.jsonl`` lines and the terminal progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """``metrics.jsonl`` writer; a no-op on ranks other than 0."""

    def __init__(self, path: Path | None) -> None:
        self._f = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class Progress:
    """A rich progress bar on a terminal console, epoch summary lines on any other console,
    nothing without one."""

    def __init__(self, console: Any, epochs: int, enabled: bool) -> None:
        self.console = console if enabled else None
        self.epochs = epochs
        self.bar = None
        self.task = None
        if self.console is not None and getattr(self.console, "is_terminal", False):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}/" + str(epochs)), BarColumn(),
                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                console=self.console)
            self.bar.start()

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task("train", total=total, completed=done, epoch=epoch, stats="")

    def step(self, loss: float, lr: float, ips: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1,
                            stats=f"loss {loss:.4f}  lr {lr:.2e}  {ips:.0f} img/s")

    def epoch_done(self, m: Any) -> None:
        if self.console is not None:
            self.console.print(
                f"epoch {m.epoch}/{self.epochs}: train loss {m.train_loss:.4f}, val loss "
                f"{m.val_loss:.4f}, top-1 {100 * m.val_top1:.2f}%, top-5 {100 * m.val_top5:.2f}%, "
                f"lr {m.lr:.2e}, {m.images_per_s:.0f} img/s", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
