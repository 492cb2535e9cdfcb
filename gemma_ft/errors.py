"""Errors caused by the user's input. The CLI prints their message on one line and exits with status 2."""

import sys
from typing import NoReturn

USER_ERROR_EXIT = 2


def fail(program: str, message: str) -> NoReturn:
    """End the command on a user's mistake: one line on stderr, exit status 2."""
    # One write of the whole line: under torchrun every rank fails at once on a shared stderr, and print's
    # separate write of the newline let two ranks' messages run together on one line.
    sys.stderr.write(f"{program}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(USER_ERROR_EXIT)


class UserError(Exception):
    """Base class: the message names the key, file, column or row, and the fix."""


class ConfigError(UserError, ValueError):
    """A config value is wrong or contradicts another."""


class DataError(UserError, ValueError):
    """The CSV cannot be used as given."""


class TemplateError(UserError, RuntimeError):
    """The tokenizer does not render the Gemma 3 chat template as training needs it."""
