"""The `fovea` command line: help lists every option with its default, engine options come from EngineConfig,
`generate` prints what `LLM` generates, `bench` reports its figures, `train` / `eval` / `data shapes` hand their
arguments to their packages' own command lines."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib

import pytest

from fovea import LLM, SamplingParams
from fovea.config import EngineConfig
from fovea.entrypoints import cli
from fovea.entrypoints.media_config import MediaConfig
from fovea.training.shapes import generate_shapes
from tests.entrypoints import ROOT, png_bytes, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

FAST = ["--dtype", "float32", "--num-kv-blocks", "64", "--num-threads", "1"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return str(build_tiny_blip2(tmp_path_factory.mktemp("cli_blip"), seed=0))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_images")
    paths = []
    for i, size in enumerate([(40, 30), (90, 60)]):
        path = folder / f"img{i}.png"
        path.write_bytes(png_bytes(random_image(i, *size)))
        paths.append(str(path))
    return paths


def help_text(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fovea.entrypoints.cli", *argv, "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0, out.stderr
    return out.stdout


def option_blocks(text: str) -> dict[str, str]:
    """'--flag' -> its help, from argparse's layout (options start a line with two spaces and a dash)."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-\S+)", line)
        if match:
            current = match.group(1).rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_help_lists_every_option_with_its_default():
    top = help_text()
    for command in ("serve", "generate", "bench"):
        assert command in top
    engine_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(EngineConfig) if f.name != "model"}
    for command in ("serve", "generate", "bench"):
        blocks = option_blocks(help_text(command))
        assert engine_flags <= set(blocks), engine_flags - set(blocks)
        for flag, block in blocks.items():
            if flag not in ("-h", "--prompt"):  # --prompt is required: it has no default
                assert "(default: " in block, (command, flag, block)
    serve = option_blocks(help_text("serve"))
    assert "(default: 8000)" in serve["--port"] and "(default: 128)" in serve["--max-num-seqs"]
    assert "(default: True)" in serve["--enable-prefix-caching"]


def test_engine_options_parse_into_engine_config_fields():
    args = cli.build_parser().parse_args(["serve", "m", "--no-enable-prefix-caching", "--max-num-seqs", "7",
                                          "--limit-mm-per-prompt", '{"image": 2}', "--memory-utilization", "0.3"])
    kwargs = cli.engine_kwargs(args)
    assert set(kwargs) == {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    assert kwargs["enable_prefix_caching"] is False and kwargs["max_num_seqs"] == 7
    assert kwargs["limit_mm_per_prompt"] == {"image": 2} and kwargs["memory_utilization"] == 0.3
    assert kwargs["dtype"] == "auto" and kwargs["block_size"] == 16  # EngineConfig's defaults
    assert kwargs["quantization"] is None and kwargs["quantize_lm_head"] is False
    args = cli.build_parser().parse_args(["serve", "m", "--quantization", "int8", "--quantize-lm-head"])
    assert cli.engine_kwargs(args)["quantization"] == "int8" and cli.engine_kwargs(args)["quantize_lm_head"] is True
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "m", "--limit-mm-per-prompt", "[1]"])


def test_parallel_sizes_take_vllm_spellings():
    for argv in (["-tp", "2", "-pp", "3"], ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "3"]):
        kwargs = cli.engine_kwargs(cli.build_parser().parse_args(["serve", "m", *argv]))
        assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (2, 3)
    kwargs = cli.engine_kwargs(cli.build_parser().parse_args(["generate", "--prompt", "x"]))
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (1, 1)
    assert kwargs["distributed_executor_backend"] is None


def test_media_flags_parse_into_media_config(tmp_path):
    default = cli.media_config(cli.build_parser().parse_args(["serve", "m"]))
    assert default == MediaConfig()  # the flags' defaults are the config's documented ones
    args = cli.build_parser().parse_args([
        "serve", "m", "--allowed-media-domains", "Images.Example.com", "10.0.0.7", "--allow-private-media-urls",
        "--max-image-pixels", "5", "--max-video-frame-pixels", "6", "--max-video-frames", "7",
        "--max-concurrent-media-decodes", "3", "--max-media-bytes", "8", "--media-fetch-timeout-s", "0.5",
        "--allowed-local-media-path", str(tmp_path)])
    assert cli.media_config(args) == MediaConfig(
        max_media_bytes=8, media_fetch_timeout_s=0.5, allowed_local_media_path=str(tmp_path),
        allowed_media_domains=("images.example.com", "10.0.0.7"), allow_private_media_urls=True,
        max_image_pixels=5, max_video_frame_pixels=6, max_video_frames=7, max_concurrent_media_decodes=3)
    with pytest.raises(ValueError, match="max_concurrent_media_decodes must be >= 1"):
        cli.media_config(cli.build_parser().parse_args(["serve", "m", "--max-concurrent-media-decodes", "0"]))


def test_generate_prints_what_llm_generates(blip_dir, images, capsys):
    expected = LLM(blip_dir, dtype="float32", num_kv_blocks=64).generate(
        {"prompt": "a photo of", "multi_modal_data": {"image": images[0]}},
        SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert cli.main(["generate", "--model", blip_dir, "--image", images[0], "--prompt", "a photo of",
                     "--max-tokens", "8", *FAST]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_uses_the_chat_template_and_takes_several_images(tmp_path, images, capsys):
    qwen_dir = str(build_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[0]}},
                                             {"type": "image_url", "image_url": {"url": images[1]}},
                                             {"type": "text", "text": "Compare them."}]}]
    expected = LLM(qwen_dir, dtype="float32", num_kv_blocks=64).chat(
        messages, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    argv = ["generate", "--model", qwen_dir, "--image", images[0], "--image", images[1],
            "--prompt", "Compare them.", "--max-tokens", "8", *FAST]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_defaults_to_the_demo_model(blip_dir, images, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "DEMO_MODEL_PATH", tmp_path / "no-demo-here")
    assert cli.main(["generate", "--prompt", "a photo of", *FAST]) == 2
    assert "make demo" in capsys.readouterr().err
    monkeypatch.setattr(cli, "DEMO_MODEL_PATH", blip_dir)
    assert cli.main(["generate", "--image", images[0], "--prompt", "a photo of", "--max-tokens", "3", *FAST]) == 0
    assert capsys.readouterr().out.strip()


def test_bench_reports_its_figures(blip_dir, capsys):
    assert cli.main(["bench", "--model", blip_dir, "--num-requests", "6", "--output-len", "5", "--image-size", "32",
                     "--num-distinct-images", "2", *FAST]) == 0
    report = capsys.readouterr().out
    for words in ("requests/s", "output tokens/s", "time to first token", "time per output token", "6 requests"):
        assert words in report


def test_serve_generate_and_bench_print_the_active_cpu_kernel_paths(blip_dir, images, capsys, monkeypatch):
    from fovea import kernels
    from fovea.entrypoints.openai import app as server

    started = []
    monkeypatch.setattr(server, "run_server", lambda config, *args, **kwargs: started.append(config))
    assert cli.main(["serve", blip_dir, "--cpu-kernels", "off"]) == 0
    assert started[0].cpu_kernels == "off"
    off = ("cpu kernels: fused=off (cpu_kernels=off) paged_attention=off (cpu_kernels=off) "
           "amx_linear=off (cpu_kernels=off) onednn_linear=off (cpu_kernels=off) int8_linear=off (cpu_kernels=off) "
           "bf16_linear=off (cpu_kernels=off) rows_linear=off (cpu_kernels=off)")
    assert capsys.readouterr().err.splitlines() == [off]

    assert cli.main(["generate", "--model", blip_dir, "--image", images[0], "--prompt", "a photo of",
                     "--max-tokens", "2", *FAST]) == 0
    auto = kernels.status().summary()
    assert kernels.get_mode() == "auto" and auto.startswith("cpu kernels: fused=")
    out = capsys.readouterr()
    assert out.err.splitlines()[0] == auto and auto not in out.out  # stdout keeps only the text

    assert cli.main(["bench", "--model", blip_dir, "--num-requests", "2", "--output-len", "2", "--image-size", "0",
                     *FAST]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines()[0] == auto and f"  {auto}\n" in out.out  # the report names them too

    assert cli.main(["generate", "--model", blip_dir, "--prompt", "x", "--cpu-kernels", "fast", *FAST]) == 2
    assert "cpu_kernels='fast' is not a mode; choose one of auto, off, require" in capsys.readouterr().err


def fovea(*argv: str) -> subprocess.CompletedProcess:
    """The real command line in a subprocess (what the `fovea` console script runs, see the test below)."""
    return subprocess.run([sys.executable, "-m", "fovea.entrypoints.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""})


def test_console_script_runs_cli_main():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["fovea"] == "fovea.entrypoints.cli:main"


def test_help_lists_train_eval_and_data():
    top = help_text()
    listed = {m.group(1) for m in re.finditer(r"^ {4}(\w+) {2,}\S", top, re.MULTILINE)}
    assert listed == {"serve", "generate", "bench", "train", "eval", "data"}
    assert "{serve,generate,bench,train,eval,data}" in top


def test_data_shapes_writes_the_splits_as_the_generator_does(tmp_path):
    out = fovea("data", "shapes", "--out", str(tmp_path / "cli"), "--num", "6", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "wrote 6 images" in out.stdout
    expected = generate_shapes(tmp_path / "direct", 6, seed=3)
    for split, path in expected.items():
        written = tmp_path / "cli" / f"{split}.jsonl"
        assert written.read_text() == path.read_text(), split
    assert sum(len(p.read_text().splitlines()) for p in expected.values()) == 6


@pytest.mark.parametrize("command, words", [("train", ["stage1", "stage2", "export"]),
                                            ("eval", ["retrieval", "caption", "vqa"])])
def test_train_and_eval_hand_their_arguments_over(command, words):
    out = fovea(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: fovea {command} ")  # the command the user typed, not python -m
    for word in words:
        assert word in out.stdout
    bad = fovea(command, "nope")  # their own parser's error, not the top-level one
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr and words[0] in bad.stderr


@pytest.mark.parametrize("argv", [["data", "nope"], ["data"]])
def test_data_without_a_known_generator_names_the_generators(argv):
    out = fovea(*argv)
    assert out.returncode == 2
    assert "shapes" in out.stderr and ("'nope'" in out.stderr) == (argv == ["data", "nope"])
    assert not out.stdout
