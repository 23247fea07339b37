"""The demo's pre-training pieces: scene targets worked out by hand, packing that keeps a scene's texts together,
a pre-trained OPT directory that transformers loads with the same logits, and a ViT checkpoint that stages
read with vision_from."""
import json

import pytest
import torch
from transformers import OPTForCausalLM as HFOPTForCausalLM

from fovea.models.blip2 import BlipVisionModel
from fovea.training.lm import opt_logits
from fovea.training.lm_pretrain import encode_documents, pretrain_lm, scene_context, scene_documents, scene_rows
from fovea.training.losses import IGNORE_INDEX
from fovea.training.shapes import GRID
from fovea.training.vision_pretrain import IGNORE, pretrain_vision, scene_targets
from fovea.training.weights import load_parts
from tests.training.tiny import shapes_data


def test_scene_targets_by_hand():
    scene = {"background": "white", "objects": [
        {"shape": "circle", "colour": "red", "size": "small", "cell": 0},
        {"shape": "circle", "colour": "red", "size": "small", "cell": 4},
        {"shape": "diamond", "colour": "blue", "size": "large", "cell": 8}]}
    t = scene_targets([scene])
    # COLOURS order: red green blue yellow purple orange white black gray; SHAPES: circle square triangle diamond
    assert t.background.tolist() == [6]
    assert t.counts.tolist() == [[2, 0, 0, 1]]
    assert t.colours.tolist() == [[0, IGNORE, IGNORE, 2]] and t.sizes.tolist() == [[0, IGNORE, IGNORE, 1]]
    assert t.cells.tolist() == [[1, 0, 0, 0, 1, 0, 0, 0, 4]]
    assert t.cell_colours.tolist() == [[0] + [IGNORE] * 3 + [0] + [IGNORE] * 3 + [2]]
    assert t.cell_sizes[0, 8].item() == 1 and t.cells.shape == (1, GRID * GRID)


def test_scene_context_names_the_caption_and_each_single_shapes_place():
    record = {"caption": "two small red circles and one large blue diamond on a white background",
              "scene": {"background": "white", "objects": [
                  {"shape": "circle", "colour": "red", "size": "small", "cell": 0},
                  {"shape": "circle", "colour": "red", "size": "small", "cell": 4},
                  {"shape": "diamond", "colour": "blue", "size": "large", "cell": 8}]}}
    assert scene_context(record) == record["caption"] + " , diamond bottom right"


class _ToyTokenizer:
    """Word ids from a fixed table; `</s>` = 2 first as OPT's tokenizer puts it."""
    pad_token_id, eos_token_id = 1, 2
    words = {"a": 10, "b": 11, "c": 12, "q": 13}

    def __call__(self, texts, add_special_tokens=True):
        class Out:
            pass
        out = Out()
        out.input_ids = [([2] if add_special_tokens else []) + [self.words[w] for w in t.split()] for t in texts]
        return out


def test_scene_rows_put_the_padded_context_first_and_train_on_the_texts_only():
    encoded = encode_documents(_ToyTokenizer(), [["a b", "c", "q a"]], context_len=4)
    assert encoded == [([10, 11, 1, 1], [[2, 12, 2], [2, 13, 10, 2]])]
    ids, mask, labels = scene_rows(encoded, [0], seq_len=12, pad_id=1, generator=torch.Generator(),
                                   skip_caption=0.0)
    assert ids[0].tolist() == [10, 11, 1, 1, 2, 12, 2, 2, 13, 10, 2, 1]  # context, caption, question, padding
    assert mask[0].tolist() == [1] * 11 + [0]
    assert labels[0].tolist() == [IGNORE_INDEX] * 4 + [2, 12, 2, 2, 13, 10, 2] + [IGNORE_INDEX]
    no_caption, _, _ = scene_rows(encoded, [0], seq_len=12, pad_id=1, generator=torch.Generator(), skip_caption=1.0)
    assert no_caption[0].tolist() == [10, 11, 1, 1, 2, 13, 10, 2, 1, 1, 1, 1]
    short, _, short_labels = scene_rows(encoded, [0], seq_len=6, pad_id=1, generator=torch.Generator(),
                                        skip_caption=0.0)
    assert short[0].tolist() == [10, 11, 1, 1, 2, 12] and (short_labels[0, 4:] != IGNORE_INDEX).all()  # cut
    with pytest.raises(ValueError, match="context_len=1"):
        encode_documents(_ToyTokenizer(), [["a b", "c"]], context_len=1)


def test_pretrained_opt_loads_in_transformers_with_the_same_logits(tmp_path):
    data = shapes_data(tmp_path / "shapes", num=20)
    assert scene_documents(data["train"])[0][2].startswith("Question: ")
    out = tmp_path / "opt"
    result = pretrain_lm(str(data["train"]), str(out), steps=3, batch_size=2, seq_len=96, hidden=32, layers=2,
                         heads=4, vocab_size=300, bf16=False, context_len=80, val_data=str(data["val"]),
                         log=lambda _: None)
    assert result["steps"] == 3 and 0 <= result["context_reading"]["vqa_accuracy"] <= 1
    hf = HFOPTForCausalLM.from_pretrained(out).eval()
    from fovea.models.opt import OPTForCausalLM
    from fovea.models.weights import load_weights
    ours = OPTForCausalLM(hf.config)
    load_weights(ours, out)
    ids = torch.tensor([[2, 40, 41, 42, 2, 50]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = opt_logits(ours, ours.get_input_embeddings()(ids), mask)
    assert (got - expected).abs().max() < 1e-5
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    assert "<image>" in tok.get_vocab() and tok.convert_tokens_to_ids("<image>") < hf.config.vocab_size


def test_pretrained_vit_is_what_vision_from_loads(tmp_path):
    data = shapes_data(tmp_path / "shapes", num=20)
    out = tmp_path / "vit"
    pretrain_vision(str(data["train"]), str(out), steps=2, batch_size=4, hidden=32, layers=1, heads=4, patch=16,
                    image_size=48, bf16=False, log=lambda _: None)
    config = json.loads((out / "config.json").read_text())["vision_config"]
    assert (config["image_size"], config["patch_size"]) == (48, 16)
    from transformers import Blip2VisionConfig
    holder = torch.nn.Module()
    holder.vision_model = BlipVisionModel(Blip2VisionConfig(**config))
    load_parts(holder, out, ["vision_model"])  # strict: every weight there, nothing else
    assert holder.vision_model.embeddings.position_embedding.abs().sum() > 0


def test_scenes_of_several_sizes_reach_the_vit_at_its_input_size(tmp_path):
    """The demo trains on scenes rendered at 40-96 px: each is resized by the BLIP processor to the ViT's size,
    exactly as the served model's processor resizes a user's image."""
    from PIL import Image

    from fovea.multimodal.processors import BlipImageProcessor
    from fovea.training.shapes import generate_shapes
    from fovea.training.vision_pretrain import load_split

    paths = generate_shapes(tmp_path / "d", num=6, seed=0, image_size=(40, 96, 64), splits=(1, 0, 0))
    processor = BlipImageProcessor(size=(48, 48))
    pixels, targets = load_split(paths["train"], processor)
    assert pixels.shape == (6, 3, 48, 48) and targets.cells.shape == (6, GRID * GRID)
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert sorted(r["image_size"] for r in records) == [40, 40, 64, 64, 96, 96]
    for row, record in zip(pixels, records):
        with Image.open(tmp_path / "d" / record["image"]) as image:
            assert torch.equal(row, processor([image.convert("RGB")])["pixel_values"][0])
