"""Old module paths, kept working for one release (0.2 drops them).

Configs written before the layout change name class paths such as ``vitkd.detection.stages.DetrTrainer``;
scripts run ``python -m vitkd.demo``. Each old name is an alias of the module that now holds the code:
importing it (a config's ``class_path``) or running it with ``-m`` works and warns once, naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "vitkd.scoring": "vitkd.selection.scoring",
    "vitkd.selection_metrics": "vitkd.selection.metrics",
    "vitkd.stages.generator": "vitkd.stages.data_free",
    "vitkd.efficient.finetune": "vitkd.stages.idlevit_finetune",
    "vitkd.efficient.shuffle_block": "vitkd.models.shuffle_block",
    "vitkd.detection.stages": "vitkd.stages.detection",
    "vitkd.generators.demo": "vitkd.demos.generators",
    "vitkd.generators.sweep": "vitkd.demos.generator_sweep",
    "vitkd.generators.variants": "vitkd.demos.generator_variants",
    "vitkd.efficient.demo": "vitkd.demos.efficient",
    "vitkd.detection.demo": "vitkd.demos.detection",
    "vitkd.demo": "vitkd.demos.pipeline",
    "vitkd.bench_wild": "vitkd.demos.bench_wild",
    "vitkd.pool_separability": "vitkd.demos.pool_separability",
    "vitkd.runs": "vitkd.demos.runs",
    "vitkd.logging": "vitkd.loggers",
    "vitkd.losses.generator": "vitkd.losses.data_free",
    # a data module class_path in a config (the CLI imports vitkd first, which installs the aliases)
    "data_modules.shard_data": "data_modules.shard_datamodule",
}


def warn_moved(old: str) -> None:
    warnings.warn(
        f"{old} moved to {MOVED[old]}: use the new path ({old} goes in vitkd 0.2)", FutureWarning, stacklevel=3
    )


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        warn_moved(self.old)
        return importlib.import_module(MOVED[self.old])

    def exec_module(self, module) -> None:
        sys.modules[self.old] = module

    def get_code(self, fullname: str):
        """``python -m OLD``: warn, then run the new module as ``__main__``."""
        new = MOVED[self.old]
        src = (
            f"import runpy, sys, warnings\n"
            f"warnings.warn('python -m {self.old} moved to python -m {new} "
            f"({self.old} goes in vitkd 0.2)', FutureWarning)\n"
            f"runpy.run_module({new!r}, run_name='__main__', alter_sys=True)\n"
        )
        return compile(src, f"<{self.old}: alias of {new}>", "exec")


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Alias(fullname))
        return None


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
