"""The prepared GPU check (scripts/gpu_video_7b.py): the 7B geometry, and the whole path at tiny size on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_seven_b_shape_has_the_real_geometry():
    from transformers import LlavaNextVideoForConditionalGeneration
    from video.tiny_model import SEVEN_B, build_config, build_processor, tokens_per_frame
    processor = build_processor(image_size=SEVEN_B.image_size)
    config = build_config(processor.tokenizer, SEVEN_B)
    with torch.device("meta"):
        model = LlavaNextVideoForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    assert 6.8e9 < n < 7.2e9  # Vicuna-7B + CLIP ViT-L/14 + projector, small vocabulary
    assert tokens_per_frame(processor) == 144  # (336 / 14 / 2)^2, as the 7B-hf checkpoint


def test_gpu_check_runs_end_to_end_at_tiny_size_on_cpu(tmp_path):
    from video.synthetic import generate_split
    generate_split(tmp_path / "videos", "test", num_samples=2)  # --data-root: videos made beforehand
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_video_7b.py"), "--shape", "tiny", "--device",
                          "cpu", "--dtype", "float32", "--frames", "8", "--data-root", str(tmp_path / "videos"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["policies"]["full"]["n"] == 2 and result["policies"]["namm"]["n_errors"] == 0
    assert result["policies"]["namm"]["warm_samples"] == 1 and result["namm_over_full"]["warm_seconds_per_sample"] > 0
    assert result["namm_over_full"]["seconds_per_sample"] > 0 and "| namm |" in res.stdout


def test_a_data_root_without_videos_is_refused_before_the_model_is_built(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_video_7b.py"), "--shape", "tiny", "--device",
                          "cpu", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no synthetic test split there" in res.stderr
    assert not (tmp_path / "out").exists()
