"""``make bench-gpu``'s script in its CPU mode: the results file, its name and its measured values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import gpu


@pytest.mark.slow
def test_bench_gpu_quick_cpu(tmp_path):
    res = gpu.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path)])
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [f"gpu-{gpu.slug(gpu.device_name(gpu.torch.device('cpu')))}-{res['date']}.json"]
    saved = json.loads(files[0].read_text())
    assert saved["device_slug"] and saved["torch"] and saved["wall_s"] > 0 and saved["cores"] > 0
    assert saved["peak"]["measured_peak_flop_per_s"] > 0
    assert saved["flops_per_image"]["distill_step"] > saved["flops_per_image"]["selector"] > 0
    for r in (*saved["selector"].values(), saved["distill"]):
        assert r["batch"] > 0 and r["batch"] in [t["batch"] for t in r["batch_search"] if t["fits"]]
        assert r["images_per_s"] > 0
        assert 0 < r["mfu_measured_peak"] < 1.5
        assert r["mfu_datasheet"] is None  # no datasheet peak for a CPU
        assert r["peak_memory_mb"] > 0
    loader = saved["loader"]["workers"]
    assert sorted(loader) == ["0", "1"] and all(r["images_per_s"] > 0 and r["images"] > 0 for r in loader.values())
    goals = saved["goals"]
    assert goals["selector_mfu"]["value"] == max(r["mfu_measured_peak"] for r in saved["selector"].values())
    keep = goals["loaders_keep_up"]
    fast = [int(w) for w, r in loader.items() if r["images_per_s"] >= keep["selector_images_per_s"]]
    assert keep["fewest_workers"] == (min(fast) if fast else None)


def test_bench_gpu_imports_without_optional_packages():
    """The GPU machine has no wandb, pycocotools or jsonargparse: the script must import without them."""
    block = "".join(f"sys.modules[{m!r}] = None; " for m in ("wandb", "pycocotools", "jsonargparse"))
    code = f"import sys; {block}import benchmarks.gpu"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_slug_and_datasheet():
    assert gpu.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu.datasheet_peak("NVIDIA H100 80GB HBM3") == gpu.datasheet_peak("NVIDIA H200") == 989e12
    assert gpu.datasheet_peak("NVIDIA GeForce RTX 4090") is None
