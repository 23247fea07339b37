"""benchmarks/vision_qwen.py's FLOP count on a tiny Qwen2.5-VL against one by hand from its dimensions, and the
Qwen benchmark scripts' command lines."""
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.vision_qwen import tower_flops
from fovea import LLM
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen"))


def test_vision_tower_flops_by_hand(tiny_qwen):
    visual = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, num_kv_blocks=32).llm_engine.runner.model.model.visual
    # width 32, MLP 48, 3 blocks (block 1 full attention), windows of 2x2 merged tokens = 16 patches, 14-pixel
    # patches two frames deep over 3 channels (1176 values), merged 2x2 into the LM's 64
    grids = [(1, 4, 6), (1, 8, 8)]  # 24 patches: windows of 16 and 8; 64 patches: four windows of 16
    linear, attention = tower_flops(visual, grids)
    patches, merged = 24 + 64, (24 + 64) // 4
    block = 32 * 96 + 32 * 32 + 32 * 96 + 48 * 32  # qkv, proj, gate/up, down
    assert linear == 2 * (3 * patches * block + patches * 1176 * 32 + merged * (128 * 128 + 128 * 64))
    windows, frames = 16 ** 2 + 8 ** 2 + 4 * 16 ** 2, 24 ** 2 + 64 ** 2
    assert attention == 4 * 32 * (2 * windows + frames)


@pytest.mark.parametrize("script", ["vision_qwen.py", "qwen_bound.py", "prefill_rows.py"])
def test_scripts_run_their_help(script):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--num-requests" in out.stdout or "--num-images" in out.stdout
