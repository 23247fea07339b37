"""The demo model that ships in demo/blip2-shapes (issue 5): small enough to commit, served by fovea's engine with
the held-out quality it claims, and `make demo`'s script runs on it."""
import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fovea.entrypoints.cli import DEMO_MODEL_PATH
from fovea.training.demo_model import EXAMPLES

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "demo" / "blip2-shapes"


def test_the_demo_model_ships_within_25_mb_with_examples():
    assert DEMO_MODEL_PATH == MODEL
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB"
    assert len(list((MODEL / "examples").glob("*.png"))) >= 3
    assert json.loads((MODEL / "config.json").read_text())["architectures"] == ["Blip2ForConditionalGeneration"]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A fresh held-out split with the generator's default settings (what `fovea data shapes` writes): seed 7
    (the demo trained on seed 0 and records its figures on seed 1)."""
    from fovea.training.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("heldout"), num=60, seed=7, splits=(0, 0, 1))["test"]


def test_the_data_generator_defaults_to_the_demo_models_input_size():
    from fovea.training.shapes import DEFAULT_IMAGE_SIZE, build_parser

    size = json.loads((MODEL / "processor_config.json").read_text())["image_processor"]["size"]
    assert (size["height"], size["width"]) == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    assert build_parser().parse_args(["--out", "x"]).image_size == (DEFAULT_IMAGE_SIZE,)


def test_the_demo_model_captions_and_answers_unseen_scenes(heldout):
    from fovea import LLM
    from fovea.eval.data import read_eval_images
    from fovea.eval.generation import evaluate_captions, evaluate_vqa

    items = read_eval_images(heldout)
    llm = LLM(str(MODEL), dtype="float32")
    captions = evaluate_captions(llm, items)
    vqa = evaluate_vqa(llm, items)
    # the targets, on 60 scenes the model never saw; chance is far below (1% and 36% on seed 1)
    assert captions.scores["exact_match"] >= 0.9, captions.format()
    assert vqa.accuracy >= 0.85 and vqa.accuracy > vqa.chance + 0.3, vqa.format()


def test_make_demo_script_captions_the_examples():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    truths = json.loads((MODEL / "examples" / "captions.json").read_text())
    lines = done.stdout.splitlines()
    right = sum(f"{name}: {caption!r}   (truth: {caption!r})" in lines for name, caption in truths.items())
    assert right >= len(truths) - 1, done.stdout  # the held-out exact match is 98%: one miss is allowed
    offline = [line.split(" -> ")[1] for line in lines if "how many shapes are there? ->" in line]
    assert len(offline) == 1, done.stdout
    # then one request through `fovea serve`: the chat template makes the question the prompt generate() was given
    assert "chat template: the checkpoint's own" in lines, done.stdout
    served = [line for line in lines if line.startswith("POST /v1/chat/completions (")]
    assert len(served) == 1 and f"'how many shapes are there?') -> {offline[0]}   (" in served[0], done.stdout


def test_eval_demo_reports_caption_exact_match_per_scene_size(tmp_path):
    """`make eval-demo`'s figures per scene size: the same held-out scenes rendered at each size, captioned by
    the shipped model, which is robust to the size (issue 14): at least 90% at every size from 40 to 96 px (the
    model before its size-robust ViT: 82% at 40 px, 65% at 64 px, 44% at 96 px on 500 scenes)."""
    from PIL import Image

    from fovea import LLM
    from fovea.training.demo_model import DemoPlan, Runner, caption_by_size

    plan = DemoPlan(num_test=40, eval_images=40, eval_image_sizes="40,48,64,96")
    scores = caption_by_size(plan, LLM(str(MODEL), dtype="float32"), tmp_path, Runner(tmp_path / "log"))
    assert list(scores) == ["40", "48", "64", "96"]
    assert all(s["exact_match"] >= 0.9 for s in scores.values()), scores
    assert Image.open(next((tmp_path / "heldout-96px" / "images").glob("*.png"))).size == (96, 96)
    assert "96 px" in (tmp_path / "log").read_text()


def test_the_demo_checkpoint_carries_the_template_its_build_writes(tmp_path):
    """demo/blip2-shapes/chat_template.jinja is what `--write-chat-template` writes; writing it again (or into a
    checkpoint whose tokenizer_config.json holds another template) gives the same files."""
    from fovea.training.demo_model import CHAT_TEMPLATE, main, write_chat_template

    assert (MODEL / "chat_template.jinja").read_text() == CHAT_TEMPLATE.read_text()
    assert "chat_template" not in json.loads((MODEL / "tokenizer_config.json").read_text())
    copy = tmp_path / "demo"
    copy.mkdir()
    config = {**json.loads((MODEL / "tokenizer_config.json").read_text()), "chat_template": "{{ 'stale' }}"}
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["--out", str(copy), "--write-chat-template"]) == 0
    first = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert write_chat_template(copy) == copy / "chat_template.jinja"
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == first
    assert first["chat_template.jinja"] == CHAT_TEMPLATE.read_bytes()
    assert "chat_template" not in json.loads(first["tokenizer_config.json"])
    with pytest.raises(FileNotFoundError, match="no tokenizer_config.json"):
        write_chat_template(tmp_path / "nothing")


def test_the_demo_server_captions_an_image_alone_and_answers_a_question(tmp_path):
    """`fovea serve demo/blip2-shapes`, as a new user runs it: a chat message with only an image gets the caption
    (what generate gives with the empty captioning prompt), one with a question the VQA answer."""
    import openai

    from fovea import LLM, SamplingParams
    from tests.entrypoints import ServerProcess

    image = sorted((MODEL / "examples").glob("*.png"))[0]
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    question = "how many shapes are there?"
    server = ServerProcess(MODEL, "--num-kv-blocks", "64", log_dir=tmp_path)
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(content: list[dict]):
            return client.chat.completions.create(model=str(MODEL), temperature=0.0, max_tokens=30,
                                                  messages=[{"role": "user", "content": content}])

        image_part = {"type": "image_url", "image_url": {"url": url}}
        caption = ask([image_part])
        answer = ask([image_part, {"type": "text", "text": question}])
        log = server.log_tail()
    finally:
        server.stop()
    assert "chat template: the checkpoint's own" in log
    llm = LLM(str(MODEL), dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=30)
    expected = llm.generate([{"prompt": "", "multi_modal_data": {"image": str(image)}},
                             {"prompt": f"Question: {question} Answer:", "multi_modal_data": {"image": str(image)}}],
                            params, use_tqdm=False)
    assert caption.choices[0].message.content == expected[0].outputs[0].text
    assert caption.usage.prompt_tokens == len(expected[0].prompt_token_ids)
    assert answer.choices[0].message.content == expected[1].outputs[0].text
    assert answer.usage.prompt_tokens == len(expected[1].prompt_token_ids)
    assert caption.usage.prompt_tokens < answer.usage.prompt_tokens  # BOS alone: not an empty question


@pytest.mark.slow
def test_the_demo_build_runs_every_step_of_its_plan(tmp_path):
    """`make demo-model` end to end on a plan a few steps long: data at both sizes, ViT then its distillation
    beside the LM, stages 1 and 2, the distilled ViT put under the Q-Former, and the demo directory with its
    template, examples and figures."""
    from safetensors.torch import load_file

    from fovea.training.demo_model import DemoPlan, build

    plan = DemoPlan(num_train=48, num_test=6, vision_steps=2, distill_steps=2, lm_steps=2, stage1_steps=2,
                    stage2_steps=2, batch_size=4, nproc=1, eval_images=6,
                    distill_image_sizes="40,96", eval_image_sizes="40,96")
    out, work = tmp_path / "demo", tmp_path / "work"
    build(plan, out, work)
    log = (work / "demo_model.log").read_text()
    assert "  then $ " in log and "fovea.training.vision_distill" in log
    shipped = load_file(str(out / "model.safetensors"))
    distilled = load_file(str(work / "vision-sizes" / "model.safetensors"))
    teacher = load_file(str(work / "vision" / "model.safetensors"))
    assert all(torch.equal(shipped[n], t) for n, t in distilled.items())  # the ViT shipped is the distilled one
    assert any(not torch.equal(distilled[n], t) for n, t in teacher.items())
    stage2 = load_file(str(work / "stage2" / "export" / "model.safetensors"))
    assert sorted(shipped) == sorted(stage2)
    assert all(torch.equal(shipped[n], t) for n, t in stage2.items() if not n.startswith("vision_model."))
    assert (out / "chat_template.jinja").is_file() and len(list((out / "examples").glob("*.png"))) == EXAMPLES
    figures = json.loads((out / "eval.json").read_text())
    assert list(figures["caption_by_size"]) == ["40", "96"] and "retrieval" in figures


def test_eval_caption_with_five_beams_on_the_demo_model(heldout):
    """`fovea eval caption --num-beams 5` (a real process): beam search reaches the greedy quality target too."""
    done = subprocess.run([sys.executable, "-m", "fovea.eval", "caption", "--model", str(MODEL), "--data",
                           str(heldout), "--num-beams", "5", "--max-images", "20", "--dtype", "float32", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["scores"]["exact_match"] >= 0.9, done.stdout
