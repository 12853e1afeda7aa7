"""Logger: TensorBoard event files written straight into the run's own output directory."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class Logger:
    """`purge_step`: on resume, events a killed run wrote after its last checkpoint (steps >= purge_step) are hidden by
    TensorBoard, so resumed curves continue without duplicated or stale points."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_config(self, yaml_text: str) -> None:
        # Indented four spaces so TensorBoard's markdown renderer shows it verbatim.
        self.writer.add_text("config", "\n".join("    " + line for line in yaml_text.splitlines()), global_step=0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
