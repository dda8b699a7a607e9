"""What ``verify`` is doing, on a terminal: one status line on stderr naming the stage (hashes,
the fp32 parity, each low-precision file under its contract and the onnxruntime level being
compared). A W4A4 po2 verify takes about a minute at the default ``--limit 256``; without a
terminal (a pipe, a log, ``--json``) nothing is shown."""

from __future__ import annotations

from typing import Any


class VerifyProgress:
    def __init__(self, console: Any = None, enabled: bool = True) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)
        self.stages: list[str] = []
        self.status = None
        if enabled and self.console.is_terminal:
            self.status = self.console.status("verify: starting")
            self.status.start()

    def stage(self, text: str) -> None:
        self.stages.append(text)
        if self.status is not None:
            self.status.update(f"verify: {text}")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __enter__(self) -> "VerifyProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage(progress: VerifyProgress | None, text: str) -> None:
    if progress is not None:
        progress.stage(text)
