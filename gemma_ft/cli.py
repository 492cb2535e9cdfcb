"""The `gemma-ft` console script: `gemma-ft [overrides]` trains (as `python -m gemma_ft`), and
`gemma-ft generate|evaluate|export [overrides]` use a finished run (as `python -m gemma_ft.<command>`)."""

from __future__ import annotations

import difflib
import importlib
import sys

from gemma_ft.errors import fail

COMMANDS = {"generate": "gemma_ft.generate", "evaluate": "gemma_ft.evaluate", "export": "gemma_ft.export"}


def main() -> None:
    args = sys.argv[1:]
    first = args[0] if args else ""
    if first in COMMANDS:
        sys.argv = [f"{sys.argv[0]} {first}", *args[1:]]
        importlib.import_module(COMMANDS[first]).cli()
        return
    if first and "=" not in first and not first.startswith("-"):
        close = difflib.get_close_matches(first, list(COMMANDS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"commands: {', '.join(COMMANDS)}; training takes key=value"
        fail("gemma-ft", f"unknown command {first!r}; {hint}")
    from gemma_ft.__main__ import cli

    cli()
