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
    line = _error_line(
        _cli(
            "--config",
            "experiments/digits/select.yaml",
            "--model.init_args.teacher_ckpt",
            "nope/best.ckpt",
            "--run_dir",
            str(tmp_path),
        )
    )
    assert "teacher checkpoint nope/best.ckpt does not exist" in line


def test_unknown_config_key(tmp_path):
    line = _error_line(
        _cli(
            "--config",
            "experiments/digits/teacher.yaml",
            "--model.init_args.not_a_key",
            "1",
            "--run_dir",
            str(tmp_path),
        )
    )
    assert "not_a_key" in line


def test_unknown_key_in_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        open("experiments/digits/teacher.yaml").read().replace("    lr: 2.0e-3", "    lr: 2.0e-3\n    learning_rat: 1")
    )
    line = _error_line(_cli("--config", str(cfg), "--run_dir", str(tmp_path / "run")))
    assert "learning_rat" in line


def test_probe_block_beyond_depth(tiny_teacher, tiny_pool, tmp_path):
    with pytest.raises(VitkdInputError, match="probe block index 9 is beyond the model depth 2"):
        fit(
            "--config",
            "experiments/digits/select.yaml",
            "--model.init_args.teacher_ckpt",
            str(tiny_teacher),
            "--model.init_args.probe_blocks",
            "[0, 9]",
            "--data.init_args.wild_urls",
            tiny_pool,
            "--run_dir",
            str(tmp_path),
        )


def test_num_keep_larger_than_pool(tiny_teacher, tiny_pool, tmp_path):
    with pytest.raises(VitkdInputError, match="num_keep 500 is larger than the wild pool \\(120 samples"):
        fit(
            "--config",
            "experiments/digits/select.yaml",
            "--model.init_args.teacher_ckpt",
            str(tiny_teacher),
            "--model.init_args.probe_blocks",
            "[0, 1]",
            "--model.init_args.num_keep",
            "500",
            "--data.init_args.wild_urls",
            tiny_pool,
            "--run_dir",
            str(tmp_path),
        )
    assert not (tmp_path / "selected").exists() and not (tmp_path / "scores.csv").exists()


def test_shard_sample_without_image(tiny_teacher, tmp_path):
    def samples():
        yield {"__key__": "ok0", "png": encode_png(np.zeros((8, 8), np.uint8))}
        yield {"__key__": "broken7", "txt": "no image here"}

    write_shards(samples(), tmp_path / "pool", pattern="wild-%06d.tar")
    args = (
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--model.init_args.probe_blocks",
        "[0]",
        "--model.init_args.lambda_a",
        "[0.05]",
        "--model.init_args.num_keep",
        "1",
        "--data.init_args.wild_urls",
        str(tmp_path / "pool" / "wild-000000.tar"),
    )
    with pytest.raises(VitkdInputError, match="shard sample 'broken7' in .*wild-000000.tar has no image"):
        fit(*args, "--data.init_args.strict", "true", "--run_dir", str(tmp_path / "strict"))
    # by default it is skipped and counted like an undecodable image, the other sample scored
    m = fit(*args, "--run_dir", str(tmp_path / "run"))
    assert m["num_scored"] == 1 and m["corrupt_images"] == 1 and m["skipped_samples"] == 1


def test_missing_shard_path(tiny_teacher, tmp_path):
    line = _error_line(
        _cli(
            "--config",
            "experiments/digits/select.yaml",
            "--model.init_args.teacher_ckpt",
            str(tiny_teacher),
            "--model.init_args.probe_blocks",
            "[0]",
            "--model.init_args.lambda_a",
            "[0.05]",
            "--data.init_args.wild_urls",
            str(tmp_path / "none-{000000..000001}.tar"),
            "--run_dir",
            str(tmp_path / "run"),
        )
    )
    assert "none-000000.tar does not exist" in line


def _digest(folder) -> dict:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_finished_run_is_not_replaced_unless_asked(tiny_teacher, tmp_path):
    import shutil

    run = tmp_path / "teacher"
    shutil.copytree(tiny_teacher.parent.parent, run)
    before = _digest(run)
    args = (
        "--config",
        "experiments/digits/teacher.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--run_dir",
        str(run),
    )
    with pytest.raises(
        VitkdInputError,
        match=r"--run_dir .*teacher already holds a run \(metrics.json\): pass a new --run_dir, "
        r"--ckpt_path .*last.ckpt to resume training, or --overwrite true",
    ):
        fit(*args)
    assert _digest(run) == before, "a refused run writes nothing"
    (run / "metrics.json").unlink()  # a run killed before it finished: its checkpoints still count
    with pytest.raises(VitkdInputError, match=r"already holds a run \(checkpoints/best.ckpt\)"):
        fit(*args)
    # a SLURM requeue reruns the same command: Lightning resumes it from its hpc checkpoint, so it is let through
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from vitkd.fit import earlier_results

    (run / "hpc_ckpt_1.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    assert earlier_results(run) == "checkpoints/best.ckpt", "outside SLURM an hpc checkpoint is not a resume"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
        assert earlier_results(run) is None
        (run / "metrics.json").write_text("{}")  # ... but a finished run is never a requeue, hpc checkpoint or not
        assert earlier_results(run) == "metrics.json"
    (run / "notes.txt").write_text("mine")
    (run / "samples").mkdir()
    (run / "samples" / "epoch099.png").write_bytes(b"stale")  # another stage's output: --overwrite removes it too
    m = fit(*args, "--overwrite", "true")
    assert not (run / "hpc_ckpt_1.ckpt").exists() and not (run / "samples").exists()
    assert (
        m["epochs"] == 1
        and (run / "checkpoints" / "best.ckpt").read_bytes() != (tiny_teacher.parent / "best.ckpt").read_bytes()
    )
    assert (run / "notes.txt").read_text() == "mine", "--overwrite removes vitkd's outputs only"


def test_resume_checkpoint_of_another_stage_or_model(tiny_teacher, tmp_path):
    with pytest.raises(
        VitkdInputError,
        match=r"--ckpt_path .*best.ckpt is a Classifier checkpoint, not ProbeDistillation: .*--model.teacher_ckpt",
    ):
        fit(
            "--config",
            "experiments/digits/kd_original.yaml",
            "--model.init_args.arch",
            "test_vit_patch4_16",
            "--model.init_args.teacher_ckpt",
            str(tiny_teacher),
            "--ckpt_path",
            str(tiny_teacher),
            "--run_dir",
            str(tmp_path / "a"),
        )
    with pytest.raises(
        VitkdInputError,
        match=r"does not fit this model \(model\.\S+: \(\d+.*; it was saved for arch 'test_vit_patch4_16': "
        r"pass --model.init_args.arch test_vit_patch4_16",
    ):
        fit(
            "--config",
            "experiments/digits/teacher.yaml",
            "--ckpt_path",
            str(tiny_teacher),
            "--run_dir",
            str(tmp_path / "b"),
        )
    assert not (tmp_path / "a" / "config.yaml").exists() and not (tmp_path / "b" / "config.yaml").exists()


def test_bad_values_name_the_input(tiny_teacher, tiny_pool, tmp_path):
    import torch

    teacher = (
        "--config",
        "experiments/digits/teacher.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--trainer.max_epochs",
        "1",
    )
    select = (
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.num_keep",
        "5",
    )
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: [1, 2\nmodel: x\n")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    plain = tmp_path / "plain_sd.pt"
    torch.save(
        {k.removeprefix("model."): v for k, v in torch.load(tiny_teacher, weights_only=False)["state_dict"].items()},
        plain,
    )
    cases = [
        ((*teacher, "--run_dir", str(afile)), r"--run_dir .*afile is a file: pass a folder"),
        (
            (*teacher, "--torch_threads", "-1", "--run_dir", str(tmp_path / "r1")),
            r"--torch_threads -1 must be a positive integer",
        ),
        (
            (*teacher, "--data.init_args.img_size", "0", "--run_dir", str(tmp_path / "r2")),
            r"--data.init_args.img_size 0 must be a positive integer",
        ),
        (
            (*teacher, "--ckpt_path", str(tiny_teacher.parent), "--run_dir", str(tmp_path / "r3")),
            r"--ckpt_path .*checkpoints is a folder: pass the checkpoint file in it",
        ),
        (("--config", str(binary), "--run_dir", str(tmp_path / "r4")), r"--config .*bin.yaml is not a UTF-8 YAML file"),
        (
            ("--config", str(broken), "--run_dir", str(tmp_path / "r4")),
            r"--config .*broken.yaml is not valid YAML \(line 3, column 6: expected ',' or ']'",
        ),
        (
            ("--config", str(scalar), "--run_dir", str(tmp_path / "r4")),
            r"--config .*scalar.yaml holds a str, not a mapping of keys",
        ),
        (
            (
                *select,
                "--model.init_args.teacher_ckpt",
                str(tiny_teacher),
                "--data.init_args.wild_urls",
                "",
                "--run_dir",
                str(tmp_path / "r5"),
            ),
            r"--data.init_args.wild_urls is empty: .*or leave it unset for the embedded pool",
        ),
        (
            (
                *select,
                "--model.init_args.teacher_ckpt",
                str(tiny_teacher.parent.parent),
                "--data.init_args.wild_urls",
                tiny_pool,
                "--run_dir",
                str(tmp_path / "r6"),
            ),
            r"teacher checkpoint .* is a folder: pass the checkpoint file in it",
        ),
        (
            (
                *select,
                "--model.init_args.teacher_ckpt",
                str(plain),
                "--model.init_args.teacher_arch",
                "digits_teacher_patch4_16",
                "--data.init_args.wild_urls",
                tiny_pool,
                "--run_dir",
                str(tmp_path / "r7"),
            ),
            r"teacher checkpoint .*plain_sd.pt does not fit arch 'digits_teacher_patch4_16' \(\S+: \(.*pass the arch",
        ),
    ]
    for args, message in cases:
        with pytest.raises(VitkdInputError, match=message) as err:
            fit(*args)
        assert "\n" not in str(err.value)
    assert afile.read_text() == "keep me"
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 8)), "nothing written for a refused run"


def test_wrong_types_name_the_key_and_the_value(tmp_path):
    cases = [
        (
            ("--config", "experiments/digits/select.yaml", "--model.init_args.num_keep", "abc"),
            "--model.init_args.num_keep: expected int, got abc",
        ),
        (
            ("--config", "experiments/digits/teacher.yaml", "--data.init_args.batch_size", "1.5"),
            "--data.init_args.batch_size: expected int, got 1.5",
        ),
        (
            ("--config", "experiments/digits/teacher.yaml", "--trainer.precision", "8-bogus"),
            "--trainer.precision: 8-bogus is not an accepted value",
        ),
    ]
    for args, words in cases:
        line = _error_line(_cli(*args, "--run_dir", str(tmp_path / "r")))
        assert words in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--wild_pool_seed", "-1"], "--wild_pool_seed: must be ≥ 0, got -1"),
        (["--wild_pool_size", "0"], "--wild_pool_size: must be a positive integer, got 0"),
        (["--data_dir", "FILE", "--wild_pool_size", "5"], "--data_dir FILE: cannot write the pool there"),
    ],
)
def test_writing_the_pool_ahead_names_the_bad_option(tmp_path, args, named):
    afile = tmp_path / "a_file"
    afile.write_text("")
    args = [str(afile) if a == "FILE" else a for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "data_modules.digits", *args], capture_output=True, text=True, timeout=120
    )
    err = proc.stderr.strip()
    assert proc.returncode != 0 and err.count("\n") == 0 and err.startswith("vitkd: error:"), err[-2000:]
    assert named.replace("FILE", str(afile)) in err


def test_digits_module_names_a_bad_pool_seed():
    from data_modules.digits import DigitsDataModule

    with pytest.raises(VitkdInputError, match="--data.init_args.wild_pool_seed -1 must be an integer ≥ 0"):
        DigitsDataModule(wild_pool_seed=-1)
