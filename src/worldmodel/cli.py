"""How scripts report mistakes a user can fix: one paragraph on stderr and exit code 2, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys

from worldmodel.errors import WorldModelError

#: Set WORLDMODEL_DEBUG=1 to get the full traceback instead.
DEBUG_ENV = "WORLDMODEL_DEBUG"


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except WorldModelError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {err}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
