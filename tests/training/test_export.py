"""Exports: a short stage-1 run exports a Blip2ForImageTextRetrieval that transformers loads and scores exactly
as fovea's ImageTextScorer does; a short stage-2 run on top exports a Blip2ForConditionalGeneration that
transformers loads and fovea.LLM serves, with the same greedy tokens in both."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from fovea import LLM, SamplingParams
from fovea.training.build import export_checkpoint
from fovea.training.config import TrainConfig
from fovea.training.scoring import ImageTextScorer
from fovea.training.trainer import train
from tests.oracle.blip2 import hf_reference
from tests.training.tiny import build_opt_dir, model_json, qformer_tokenizer, shapes_data

TEXTS = ["two small red circles on a white background", "one large blue square", "three green triangles",
         "one small yellow diamond and two large black circles on a gray background"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    data = shapes_data(folder / "shapes", num=40)
    qformer_tokenizer().save_pretrained(folder / "qtok")
    common = dict(train_data=str(data["train"]), batch_size=8, max_steps=4, warmup_steps=1, lr=1e-3,
                  progress=False, save_every=100)
    stage1 = train(TrainConfig(stage="stage1", output_dir=str(folder / "s1"), model_config=model_json(
        folder / "model.json"), qformer_tokenizer=str(folder / "qtok"), max_text_len=24, **common))
    opt_dir = build_opt_dir(folder / "opt")
    stage2 = train(TrainConfig(stage="stage2", output_dir=str(folder / "s2"), init_from=str(stage1.export_dir),
                               language_model=str(opt_dir), max_text_len=40, **common))
    images = [Image.open(data["test"].parent / json.loads(line)["image"]).convert("RGB")
              for line in data["test"].read_text().splitlines()[:3]]
    return stage1, stage2, images


def test_stage1_export_loads_in_transformers_with_every_weight(runs):
    stage1, _, _ = runs
    _, info = Blip2ForImageTextRetrieval.from_pretrained(stage1.export_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@torch.no_grad()
def test_stage1_scores_equal_transformers(runs):
    stage1, _, images = runs
    hf = Blip2ForImageTextRetrieval.from_pretrained(stage1.export_dir).eval()
    scorer = ImageTextScorer.from_pretrained(stage1.export_dir, max_text_len=24)
    image_emb, text_emb = scorer.embed_images(images), scorer.embed_texts(TEXTS)
    pixels = scorer.image_processor(images)["pixel_values"]
    itc = hf(pixel_values=pixels, input_ids=text_emb.input_ids, attention_mask=text_emb.attention_mask,
             use_image_text_matching_head=False).logits_per_image
    assert (scorer.itc_scores(image_emb, text_emb) - itc).abs().max() < 1e-5
    pairs = [(i, j) for i in range(3) for j in range(4)]
    i, j = torch.tensor(pairs).unbind(1)
    itm = hf(pixel_values=pixels[i], input_ids=text_emb.input_ids[j], attention_mask=text_emb.attention_mask[j],
             use_image_text_matching_head=True).logits_per_image.softmax(dim=-1)[:, 1]
    probs = scorer.itm_probs(image_emb, text_emb, pairs)
    assert (probs - itm).abs().max() < 1e-5 and probs.std() > 1e-4
    # the training checkpoint scores the same as its export
    from_checkpoint = ImageTextScorer.from_pretrained(stage1.checkpoint, max_text_len=24)
    again = from_checkpoint.itc_scores(from_checkpoint.embed_images(images), from_checkpoint.embed_texts(TEXTS))
    assert torch.allclose(again, scorer.itc_scores(image_emb, text_emb), atol=1e-6)


def test_export_command_rewrites_the_same_checkpoint(runs, tmp_path):
    stage1, stage2, _ = runs
    for run in (stage1, stage2):
        out = export_checkpoint(run.checkpoint, tmp_path / run.output_dir.name)
        a, b = load_file(out / "model.safetensors"), load_file(run.export_dir / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_export_loads_in_transformers_with_every_weight(runs):
    _, stage2, _ = runs
    _, info = Blip2ForConditionalGeneration.from_pretrained(stage2.export_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_stage2_export_generates_the_same_greedy_tokens_in_fovea_and_transformers(runs):
    _, stage2, images = runs
    llm = LLM(str(stage2.export_dir), dtype="float32", block_size=4)
    prompts = ["", "Question: how many shapes are there? Answer:", "a picture of"]
    cases = [(p, img) for p in prompts for img in images]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": img}} for p, img in cases], params,
                        use_tqdm=False)
    generated = []
    for (prompt, image), out in zip(cases, outs):
        expected, _ = hf_reference(stage2.export_dir, prompt, image, max_new_tokens=8)
        assert out.outputs[0].token_ids == expected, prompt
        generated.append(tuple(expected))
    assert len(set(generated)) > 1  # the image and the prompt matter


def test_eval_commands_print_figures_and_chance(runs, capsys):
    from fovea.eval.__main__ import main as eval_main

    stage1, stage2, _ = runs
    test_split = str(stage1.output_dir.parent / "shapes" / "test.jsonl")
    assert eval_main(["retrieval", "--model", str(stage1.export_dir), "--data", test_split, "--json"]) == 0
    out = capsys.readouterr().out
    assert "chance" in out and "i2t_r1" in out and json.loads(out.splitlines()[-1])["chance"]["t2i_r1"] > 0
    assert eval_main(["vqa", "--model", str(stage2.export_dir), "--data", test_split, "--max-images", "2",
                      "--dtype", "float32"]) == 0
    assert "chance" in capsys.readouterr().out
