"""Errors caused by the user's input. The CLI prints their message on one line and exits with status 2."""

import sys
from typing import NoReturn

USER_ERROR_EXIT = 2


def say(line: str) -> None:
    """One line on stderr, in one write: under torchrun every rank reports at once on a shared stderr, and print's
    separate write of the newline let two ranks' lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def fail(program: str, message: str) -> NoReturn:
    """End the command on a user's mistake: one line on stderr, exit status 2."""
    say(f"{program}: error: {message}")
    sys.exit(USER_ERROR_EXIT)


class UserError(Exception):
    """Base class: the message names the key, file, column or row, and the fix."""


class ConfigError(UserError, ValueError):
    """A config value is wrong or contradicts another."""


class DataError(UserError, ValueError):
    """The CSV cannot be used as given."""


class TemplateError(UserError, RuntimeError):
    """The tokenizer does not render the Gemma 3 chat template as training needs it."""
