"""Errors a user can fix: each names the config key or file, what was given, and what would be valid."""

from __future__ import annotations


class WorldModelError(Exception):
    """Base for errors that scripts print as one paragraph instead of a traceback."""


class ConfigError(WorldModelError, ValueError):
    def __init__(self, key: str, given: object, valid: str):
        self.key, self.given, self.valid = key, given, valid
        super().__init__(f"Invalid config `{key}={given}`: expected {valid}.")


class NotEnoughDataError(WorldModelError, ValueError):
    """Raised by ReplayBuffer.sample when fewer steps are stored than one sequence needs."""
