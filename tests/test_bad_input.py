"""Bad input gives a one-line error that names the input."""
import subprocess
import sys

import numpy as np
import pytest

from data_modules.shards import encode_png, write_shards
from tests.conftest import fit
from vitkd.errors import VitkdInputError


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitkd.fit", *args], capture_output=True, text=True, timeout=300)


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vitkd: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_missing_teacher_checkpoint(tmp_path):
    line = _error_line(_cli("--config", "experiments/digits/select.yaml", "--model.init_args.teacher_ckpt", "nope/best.ckpt", "--run_dir", str(tmp_path)))
    assert "teacher checkpoint nope/best.ckpt does not exist" in line


def test_unknown_config_key(tmp_path):
    line = _error_line(_cli("--config", "experiments/digits/teacher.yaml", "--model.init_args.not_a_key", "1", "--run_dir", str(tmp_path)))
    assert "not_a_key" in line


def test_unknown_key_in_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(open("experiments/digits/teacher.yaml").read().replace("    lr: 2.0e-3", "    lr: 2.0e-3\n    learning_rat: 1"))
    line = _error_line(_cli("--config", str(cfg), "--run_dir", str(tmp_path / "run")))
    assert "learning_rat" in line


def test_probe_block_beyond_depth(tiny_teacher, tiny_pool, tmp_path):
    with pytest.raises(VitkdInputError, match="probe block index 9 is beyond the model depth 2"):
        fit("--config", "experiments/digits/select.yaml", "--model.init_args.teacher_ckpt", str(tiny_teacher),
            "--model.init_args.probe_blocks", "[0, 9]", "--data.init_args.wild_urls", tiny_pool, "--run_dir", str(tmp_path))


def test_num_keep_larger_than_pool(tiny_teacher, tiny_pool, tmp_path):
    with pytest.raises(VitkdInputError, match="num_keep 500 is larger than the wild pool \\(120 samples"):
        fit("--config", "experiments/digits/select.yaml", "--model.init_args.teacher_ckpt", str(tiny_teacher),
            "--model.init_args.probe_blocks", "[0, 1]", "--model.init_args.num_keep", "500",
            "--data.init_args.wild_urls", tiny_pool, "--run_dir", str(tmp_path))
    assert not (tmp_path / "selected").exists() and not (tmp_path / "scores.csv").exists()


def test_shard_sample_without_image(tiny_teacher, tmp_path):
    def samples():
        yield {"__key__": "ok0", "png": encode_png(np.zeros((8, 8), np.uint8))}
        yield {"__key__": "broken7", "txt": "no image here"}

    write_shards(samples(), tmp_path / "pool", pattern="wild-%06d.tar")
    with pytest.raises(VitkdInputError, match="shard sample 'broken7' in .*wild-000000.tar has no image"):
        fit("--config", "experiments/digits/select.yaml", "--model.init_args.teacher_ckpt", str(tiny_teacher),
            "--model.init_args.probe_blocks", "[0]", "--model.init_args.lambda_a", "[0.05]", "--model.init_args.num_keep", "1",
            "--data.init_args.wild_urls", str(tmp_path / "pool" / "wild-000000.tar"), "--run_dir", str(tmp_path / "run"))


def test_missing_shard_path(tiny_teacher, tmp_path):
    line = _error_line(_cli("--config", "experiments/digits/select.yaml", "--model.init_args.teacher_ckpt", str(tiny_teacher),
                            "--model.init_args.probe_blocks", "[0]", "--model.init_args.lambda_a", "[0.05]",
                            "--data.init_args.wild_urls", str(tmp_path / "none-{000000..000001}.tar"), "--run_dir", str(tmp_path / "run")))
    assert "none-000000.tar does not exist" in line
