"""Errors a user can fix. The CLI turns them into one message and exit code 2; anything else is a bug."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: names the field or file and the fix. Exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(message)


class SpecError(UserError):
    """One or more problems in the run spec, gathered into one message (one line each)."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        head = "invalid run spec:" if len(self.problems) > 1 else "invalid run spec: "
        body = ("\n  - " + "\n  - ".join(self.problems)) if len(self.problems) > 1 else self.problems[0]
        super().__init__(head + body)


class RunFailed(Exception):
    """A run that started and failed (exit 1), or stopped for a reason with its own exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        self.exit_code = exit_code
        super().__init__(message)


# Exit codes, one table (README "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_REQUEUE = 3  # stopped on a preemption/time-limit signal after a complete checkpoint
EXIT_HANG = 4  # the watchdog saw no progress
EXIT_OOM = 5
