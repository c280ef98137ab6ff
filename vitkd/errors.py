"""One exception type for bad user input: its message is one line naming the input and the fix."""
from __future__ import annotations


class VitkdInputError(ValueError):
    """Raised for bad input (paths, config values, data). ``str(err)`` is a single actionable line.

    The config parser wraps errors raised while it builds classes into its own messages; the last
    instance is remembered so the entry point can report the original line (see ``unwrap``).
    """

    last: VitkdInputError | None = None

    def __init__(self, message: str):
        super().__init__(message)
        VitkdInputError.last = self

    @classmethod
    def unwrap(cls, err: BaseException) -> VitkdInputError | None:
        """The VitkdInputError behind ``err`` (itself, a cause, or one quoted in its message), if any."""
        seen = err
        while seen is not None:
            if isinstance(seen, cls):
                return seen
            seen = seen.__cause__ or seen.__context__
        if cls.last is not None and str(cls.last) in str(err):
            return cls.last
        return None
