"""Caption and VQA evaluation plumbing with a stand-in engine that answers from a table, so every figure
(including the chance levels) can be worked out by hand."""
import json
from types import SimpleNamespace

import pytest
from PIL import Image

from fovea.eval.data import read_eval_images
from fovea.eval.generation import evaluate_captions, evaluate_vqa


class TableLLM:
    """`generate` like fovea.LLM's, answering each prompt from a dict (prompt -> text); records requests."""

    def __init__(self, table):
        self.table, self.requests = table, []

    def generate(self, requests, params, use_tqdm=False):
        assert params.temperature == 0.0
        self.requests.extend(requests)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=" " + self.table[r["prompt"]](r) + " ")])
                for r in requests]

    def beam_search(self, requests, params):
        """The best beam answers from the table, the others with junk: only the first may be used."""
        self.requests.extend(requests)
        self.beam_widths = getattr(self, "beam_widths", []) + [params.beam_width]
        return [SimpleNamespace(sequences=[SimpleNamespace(text=" " + self.table[r["prompt"]](r) + " ")] +
                                [SimpleNamespace(text="junk")] * (params.beam_width - 1)) for r in requests]


@pytest.fixture
def items(tmp_path):
    records = [
        {"image": "a.png", "image_id": 0, "caption": "one red circle",
         "qa": [{"question": "how many circles are there?", "answer": "one", "type": "count"},
                {"question": "is there a red circle?", "answer": "yes", "type": "exists"}]},
        {"image": "b.png", "image_id": 1, "caption": "two blue squares",
         "qa": [{"question": "how many squares are there?", "answer": "two", "type": "count"},
                {"question": "is there a red square?", "answer": "no", "type": "exists"}]},
        {"image": "c.png", "image_id": 2, "caption": "one red circle",
         "qa": [{"question": "how many circles are there?", "answer": "one", "type": "count"}]},
    ]
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_eval_images(tmp_path / "test.jsonl")


def colour_of(request):
    return request["multi_modal_data"]["image"].getpixel((0, 0))


def test_captions_scores_and_constant_caption_chance(items):
    # the model gets images a and c right, b wrong
    llm = TableLLM({"": lambda r: "one red circle" if max(colour_of(r)[:2]) > 100 else "two red squares"})
    result = evaluate_captions(llm, items)
    assert result.predictions == ["one red circle", "two red squares", "one red circle"]
    assert result.scores["exact_match"] == pytest.approx(2 / 3)
    # chance: the most common reference, "one red circle", for every image: right on a and c
    assert result.chance["exact_match"] == pytest.approx(2 / 3)
    assert "BLEU-4" in result.format() and "chance" in result.format()


def test_vqa_accuracy_by_type_and_the_per_type_majority_chance(items):
    answers = {"how many circles are there?": "1", "how many squares are there?": "three",
               "is there a red circle?": "yes", "is there a red square?": "yes"}
    llm = TableLLM({f"Question: {q} Answer:": (lambda r, a=a: a) for q, a in answers.items()})
    result = evaluate_vqa(llm, items)
    assert result.num_questions == 5 and len(llm.requests) == 5
    # right: circles (x2, "1" == "one"), red circle; wrong: squares, red square -> 3/5
    assert result.accuracy == pytest.approx(3 / 5)
    # chance: count's majority answer is "1" (one, two, one) -> 2/3 right; exists' is a tie yes/no -> 1/2
    assert result.by_type["count"] == pytest.approx((2 / 3, 2 / 3, 3))
    assert result.by_type["exists"] == pytest.approx((1 / 2, 1 / 2, 2))
    assert result.chance == pytest.approx(3 / 5)


def test_num_beams_takes_the_best_beam_of_beam_search(items):
    llm = TableLLM({"": lambda r: "one red circle"})
    result = evaluate_captions(llm, items, num_beams=5)
    assert llm.beam_widths == [5] and result.predictions == ["one red circle"] * 3
    llm = TableLLM({f"Question: {q} Answer:": (lambda r: "one") for q in
                    ("how many circles are there?", "how many squares are there?", "is there a red circle?",
                     "is there a red square?")})
    assert evaluate_vqa(llm, items, num_beams=3).predictions == ["one"] * 5 and llm.beam_widths == [3]
