"""One exception type for bad user input: its message is one line naming the input and the fix."""

from __future__ import annotations

import argparse


class VitkdInputError(ValueError):
    """Raised for bad input (paths, config values, data). ``str(err)`` is a single actionable line.

    The config parser wraps errors raised while it builds classes into its own messages; the last
    instance is remembered so the entry point can report the original line (see ``unwrap``).
    """

    last: VitkdInputError | None = None

    def __init__(self, message: str):
        # one line whatever a quoted library message holds (e.g. tarfile lists one failure per line)
        message = "; ".join(ln.strip() for ln in str(message).splitlines() if ln.strip())
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


class OneLineParser(argparse.ArgumentParser):
    """argparse for vitkd's command lines: a usage error is one ``vitkd: error:`` line, like every other."""

    def error(self, message: str):
        self.exit(2, f"vitkd: error: {message} (see {self.prog} --help)\n")


def _int_at_least(text: str, least: int, kind: str, bound: str) -> int:
    """argparse type body: ``text`` as an integer ≥ ``least``; ``kind`` names what a non-integer should have
    been, ``bound`` what a smaller integer must be."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (the parser names the option in its one-line error)."""
    return _int_at_least(text, 1, "a positive integer", "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0, e.g. a seed (the parser names the option in its one-line error)."""
    return _int_at_least(text, 0, "an integer ≥ 0", "≥ 0")


def demo_main(main) -> None:
    """A command's entry point: a ``VitkdInputError`` (a failed run names its log) ends it with one line."""
    import sys

    try:
        main()
    except VitkdInputError as err:
        sys.exit(f"vitkd: error: {err}")
