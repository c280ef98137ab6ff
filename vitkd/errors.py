"""One exception type for bad user input: its message is one line naming the input and the fix."""


class VitkdInputError(ValueError):
    """Raised for bad input (paths, config values, data). ``str(err)`` is a single actionable line."""
