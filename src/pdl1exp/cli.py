"""Command-line error handling: a user's mistake prints its message alone and exits 2."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["EXIT_USER_ERROR", "run_command", "user_errors"]

EXIT_USER_ERROR = 2
R = TypeVar("R")

# Errors caused by what the user gave (data, config, model URI, files), as module -> class.
# Looked up only once an error happened, so that no heavy module is imported to check.
_USER_ERRORS = (
    ("pdl1exp.data.manifest", "CohortError"),
    ("hydra.errors", "HydraException"),
    ("omegaconf.errors", "OmegaConfBaseException"),
    ("mlflow.exceptions", "MlflowException"),
    ("builtins", "FileNotFoundError"),
    ("pdl1exp.workers", "WorkerCountError"),
)
_started = False  # whether a task body began: an earlier SystemExit(1) is Hydra's config error


def _loaded(module: str, name: str) -> type | None:
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


def _full_error() -> bool:
    """``HYDRA_FULL_ERROR=1`` shows the traceback of user errors too."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_errors(prog: str, *errors: type[BaseException]) -> Callable[
    [Callable[..., R]], Callable[..., R | None]
]:
    """Wrap a command's body (under ``@hydra.main``): a user error prints ``prog: message``
    on stderr and exits with status 2; a finished sweep worker prints its summary.

    Errors of other kinds (bugs) keep their traceback.

    Args:
        prog: the command's name, first on the message line.
        errors: further exception classes that are the user's to fix.
    """

    def decorate(body: Callable[..., R]) -> Callable[..., R | None]:
        @functools.wraps(body)
        def wrapper(*args: Any, **kwargs: Any) -> R | None:
            global _started
            _started = True
            try:
                return body(*args, **kwargs)
            except Exception as err:
                done = _loaded("pdl1exp.models.tuning", "WorkerDone")
                if done is not None and isinstance(err, done):
                    print(f"{prog}: {err.summary}")
                    return None
                kinds = (*errors, *filter(None, (_loaded(m, n) for m, n in _USER_ERRORS)))
                if _full_error() or not isinstance(err, kinds):
                    raise
                print(f"{prog}: {err}", file=sys.stderr)
                raise SystemExit(EXIT_USER_ERROR) from None

        return wrapper

    return decorate


def run_command(task: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` task; a bad override or config (Hydra prints the message and
    exits 1 before the task starts) exits with status 2 too."""
    try:
        task()
    except SystemExit as exit_:
        if exit_.code == 1 and not _started:
            raise SystemExit(EXIT_USER_ERROR) from None
        raise
