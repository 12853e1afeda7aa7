"""Logger: TensorBoard event files written straight into the run's own output directory."""

from __future__ import annotations

import math
import numbers
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tensorboard.compat.proto.event_pb2 import Event
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

#: Prefix of the scalar tags that hold a run's final metrics for TensorBoard's HParams tab, e.g. hparams/val/loss.
HPARAMS_PREFIX = "hparams/"
#: Tags a run writes once, for the run as a whole: a resumed run writes them anew (its config may differ, e.g. in
#: trainer.steps), so the earlier attempts' are dropped rather than shown next to the new ones.
RUN_TAGS = ("config/", "_hparams_/", HPARAMS_PREFIX)


def _framed_records(data: bytes):
    """(payload, framed bytes) of each whole record of an event file's contents. The TFRecord framing is a uint64
    length, its 4-byte CRC, the payload and the payload's CRC: copying framed bytes as they are spares recomputing
    CRCs, which tensorboard does in pure Python (0.2 s a MB). A record cut off by a kill is left out."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            return
        yield data[pos + 12 : pos + 12 + length], data[pos:end]
        pos = end


def prune_events(log_dir: str | Path, before_step: int) -> None:
    """Rewrites every event file in `log_dir` (not its subdirectories) that holds events at step >= before_step or
    RUN_TAGS, without them, each through a temporary file that replaces it whole.

    A resumed run's SummaryWriter(purge_step=...) also writes a marker that hides those steps, but only TensorBoard's
    Python loader reads it; the default (Rust) loader shows the killed attempt's points next to the resumed run's.
    Removing them from the files works with every reader. The temporary file's name holds no "tfevents", which
    TensorBoard would read as another event file if a kill left it behind (the next prune removes it)."""
    log_dir = Path(log_dir)
    for stale_tmp in log_dir.glob(".pruning-*.tmp"):
        stale_tmp.unlink()
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, kept = path.read_bytes(), []
        for payload, framed in _framed_records(data):
            event = Event.FromString(payload)
            stale = event.step >= before_step or any(v.tag.startswith(RUN_TAGS) for v in event.summary.value)
            if not (event.HasField("summary") and stale):  # the file's version record and markers are kept
                kept.append(framed)
        if sum(map(len, kept)) == len(data):  # nothing dropped, and no record cut off at the end
            continue
        tmp = log_dir / f".pruning-{path.name.removeprefix('events.out.tfevents.')}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(b"".join(kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def has_hparams(log_dir: str | Path) -> bool:
    """Whether an event file in `log_dir` holds a run's HParams summary, the last thing a finished run writes."""
    for path in Path(log_dir).glob("events.out.tfevents.*"):
        for payload, _ in _framed_records(path.read_bytes()):
            if any(v.tag.startswith(HPARAMS_PREFIX) for v in Event.FromString(payload).summary.value):
                return True
    return False


def flatten_config(cfg: DictConfig | Mapping, prefix: str = "") -> dict[str, int | float | str]:
    """Every leaf of a (resolved) config as {dotted key: value}, values that TensorBoard's HParams tab can show.

    Numbers and strings stay as they are; booleans become "true"/"false", None "null", lists their text, and an empty
    mapping "{}" (its key is kept, so runs of one sweep share one key set).
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, int | float | str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, bool) or value is None:
            flat[name] = {True: "true", False: "false", None: "null"}[value]
        elif isinstance(value, int | float | str):
            flat[name] = value
        else:  # lists, empty mappings, anything else
            flat[name] = str(value)
    return flat


class Logger:
    """`purge_step`: events earlier attempts in this directory wrote at steps >= purge_step (what a killed run logged
    after its last checkpoint; with 0, everything) are removed from their files (`prune_events`), and hidden by a
    purge marker too, so resumed curves continue without duplicated or stale points.

    A fresh run's event file is created by the first thing logged, not before: a run stopped before it logged anything
    (during its prefill) leaves no TensorBoard log in its directory, which may then take a new run (see
    cli.PreflightChecks). A resumed run's (purge_step > 0) is created at once: its purge marker hides the killed
    run's stale points even if this attempt is stopped before it logs. `config`, the resolved config as YAML text, is
    written into the file first, at step 0 (TensorBoard's Text tab); a resumed run writes its own in place of the
    earlier attempts'.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, config: str | None = None):
        self.log_dir, self.purge_step, self.config = Path(log_dir), purge_step, config
        self._writer: SummaryWriter | None = None
        if purge_step:
            self.writer.flush()

    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:
            if self.purge_step is not None:
                prune_events(self.log_dir, self.purge_step)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
            if self.config is not None:
                # Indented four spaces so TensorBoard's markdown renderer shows it verbatim.
                text = "\n".join("    " + line for line in self.config.splitlines())
                self._writer.add_text("config", text, global_step=0)
        return self._writer

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_image(self, tag: str, image, step: int) -> None:
        """An RGB image, uint8 [height, width, 3]."""
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def log_hparams(self, flat_config: DictConfig | Mapping[str, Any], metrics: Mapping[str, float], step: int = 0):
        """The run's hyperparameters and final metrics for TensorBoard's HParams tab, in this run's own event file.

        `flat_config`: {dotted key: value}; a nested config (DictConfig or dict) is flattened with flatten_config.
        `metrics`: {name: final value}, each finite number also logged as the scalar `hparams/<name>` at `step`, which
        is what the HParams tab reads. (SummaryWriter.add_hparams would write into a new subdirectory: a second run.)
        """
        hparams = flatten_config(flat_config)
        final = {f"{HPARAMS_PREFIX}{name}": float(v) for name, v in metrics.items()
                 if isinstance(v, numbers.Real) and math.isfinite(v)}  # fmt: skip
        # Not the first of the three, the experiment summary: TensorBoard shows the first run's that it finds as the
        # whole sweep's, so the keys and metrics of jobs that differ (model=gru,rssm) would be missing. Without it,
        # TensorBoard builds the table from every job's session: the union of their keys, and their scalar tags.
        _, session_start, session_end = hparams_summaries(hparams, final)
        for summary in (session_start, session_end):
            self.writer.file_writer.add_summary(summary, step)
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
