"""Old module paths keep working for one release: a config's class_path or ``python -m`` warns with the new path."""

import importlib
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from vitkd.deprecated import MOVED


def test_old_class_path_imports_the_moved_class_and_names_the_new_path():
    sys.modules.pop("vitkd.detection.stages", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from vitkd.detection.stages import DetrTrainer
    from vitkd.stages.detection import DetrTrainer as moved

    assert DetrTrainer is moved
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any("vitkd.stages.detection" in m for m in messages), messages


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_path_resolves_to_an_existing_module(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_new_paths_do_not_shadow_old_ones():
    """An alias must never hide a module that still exists under its old name."""
    for old in MOVED:
        parent, _, leaf = old.rpartition(".")
        spec = importlib.util.find_spec(parent)
        locations = spec.submodule_search_locations or []
        assert not any((Path(p) / f"{leaf}.py").exists() for p in locations), old


def test_old_module_runs_with_python_m_and_warns():
    out = subprocess.run(
        [sys.executable, "-W", "always::FutureWarning", "-m", "vitkd.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "vitkd.demos.pipeline" in out.stderr
    assert "usage" in out.stdout
