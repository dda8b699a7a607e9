"""What the training loop reports: ``metrics.jsonl`` lines and the terminal progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...convert.artifacts import write_text


def truncate_log(path: Path, step: int, epochs: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` as the checkpoint a run resumes from saw it: the step records up
    to ``step`` and the checkpoint's epoch records (its history: one that a crash kept out of the
    log comes back, duplicates written after the checkpoint go)."""
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and "step" in rec and isinstance(rec["step"], int) and rec["step"] <= step:
                records.append(rec)
    records += [dict(e) for e in epochs]
    records.sort(key=lambda r: (r.get("epoch", 0), "step" not in r, r.get("step", 0)))
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


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
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
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
