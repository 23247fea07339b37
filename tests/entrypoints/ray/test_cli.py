"""`fovea serve --num-replicas` as a real process: with Ray it serves through Ray Serve replicas on a local Ray
instance it starts (and stops at SIGTERM, leaving no process behind); without Ray, every Ray entry point says
how to install it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import httpx
import psutil
import pytest

from tests.entrypoints import ROOT, ServerProcess, data_url, random_image
from tests.entrypoints.ray.conftest import LOOPBACK_RAY_ENV, assert_gone
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

# imported first by every Python process whose path starts with its directory: makes `import ray` fail
HIDE_RAY = textwrap.dedent("""
    import sys

    class HideRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, HideRay())
""")


def run_without_ray(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(HIDE_RAY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_without_ray_the_commands_say_how_to_install_it(tmp_path):
    proof = run_without_ray(tmp_path, "-c", "import ray")
    assert proof.returncode != 0 and "No module named 'ray'" in proof.stderr  # Ray really is hidden
    served = run_without_ray(tmp_path, "-m", "fovea.entrypoints.cli", "serve", str(tmp_path), "--num-replicas", "2")
    assert served.returncode == 2
    assert "fovea serve --num-replicas needs Ray" in served.stderr and "pip install 'fovea[ray]'" in served.stderr
    batch = run_without_ray(tmp_path, "-c", "import fovea.ray; fovea.ray.batch_generate(None, model='m')")
    assert batch.returncode != 0 and "RayNotInstalledError" in batch.stderr
    assert "pip install 'fovea[ray]'" in batch.stderr
    # the single-process server does not need Ray: its --help (and everything else) still works
    helped = run_without_ray(tmp_path, "-m", "fovea.entrypoints.cli", "serve", "--help")
    assert helped.returncode == 0 and "--num-replicas" in helped.stdout


@pytest.mark.slow  # ~100 s: a Ray instance of its own; `deploy` itself is tested in test_serve.py
def test_serve_with_replicas_answers_and_stops_cleanly(tmp_path):
    qwen_dir = build_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0)
    for key, value in LOOPBACK_RAY_ENV.items():
        os.environ.setdefault(key, value)  # the server's own local Ray: set by the command too, here for clarity
    server = ServerProcess(qwen_dir, "--num-replicas", "1", "--api-key", "k", "--max-model-len", "512",
                           "--num-kv-blocks", "256", log_dir=tmp_path)
    try:
        image = random_image(0, 50, 40)
        body = {"model": str(qwen_dir), "max_tokens": 6, "temperature": 0.0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": "what?"}]}]}
        reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                           timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-fovea-replica"] and reply.json()["usage"]["completion_tokens"] == 6
        assert httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120).status_code == 401
        started = psutil.Process(server.proc.pid).children(recursive=True)  # Ray's gcs, raylet, workers, ...
        assert len(started) > 3
    finally:
        code = server.stop(timeout_s=60)
    assert code == 0, server.log_path.read_text()[-4000:]
    assert_gone(started)
