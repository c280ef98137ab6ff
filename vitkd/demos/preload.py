"""What the demos' run server imports once before it forks each run (``vitkd.demos.runs``): ``vitkd.fit`` and
the libraries under it, with import-time warnings off, as each run has them."""

import warnings

warnings.simplefilter("ignore")

import vitkd.fit  # noqa: E402,F401  (imported for its side effect: the modules every run needs, loaded once)
