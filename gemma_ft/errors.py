"""Errors caused by the user's input. The CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """Base class: the message names the key, file, column or row, and the fix."""


class ConfigError(UserError, ValueError):
    """A config value is wrong or contradicts another."""


class DataError(UserError, ValueError):
    """The CSV cannot be used as given."""


class TemplateError(UserError, RuntimeError):
    """The tokenizer does not render the Gemma 3 chat template as training needs it."""
