"""Errors a user can fix: each names the config key or file, what was given, and what would be valid."""

from __future__ import annotations


class WorldModelError(Exception):
    """Base for errors that scripts print as one paragraph instead of a traceback."""


class ConfigError(WorldModelError, ValueError):
    def __init__(self, key: str, given: object, valid: str):
        self.key, self.given, self.valid = key, given, valid
        super().__init__(f"Invalid config `{key}={given}`: expected {valid}.")


class NotEnoughDataError(WorldModelError, ValueError):
    """Raised by ReplayBuffer.sample, sample_rows and sequences when no stream (one per env) holds one sequence."""


class RunInterrupted(Exception):
    """Raised by the trainer after SIGTERM/SIGINT, once the state is checkpointed; scripts exit with 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by signal {signum} after update {step}; checkpoint: {checkpoint}")
