"""The one exception type that reaches users as a single sentence (no traceback at the CLI)."""


class UnitscopeError(Exception):
    """Bad input or a state the user can fix; the message names the bad value and what is valid."""
