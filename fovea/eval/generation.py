"""Captioning and VQA through fovea's engine (`fovea.LLM`, greedy or beam search), with their metrics and chance levels.

Chance levels are the scores of a model that ignores the image:
- captions: the most frequent reference caption, predicted for every image;
- VQA: for each question type, its most frequent answer (the "language prior"); per question text when
  the data has no types.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from fovea.eval.data import EvalImage
from fovea.eval.metrics import bleu, cider_d, exact_match, normalize_answer, vqa_accuracy

VQA_PROMPT = "Question: {} Answer:"
"""BLIP-2's zero-shot VQA prompt for OPT models."""


def generate(llm, images: Sequence[Image.Image], prompts: Sequence[str], max_tokens: int,
             num_beams: int = 1) -> list[str]:
    """Greedy text for each (image, prompt), stripped; stops at EOS or max_tokens. With `num_beams` > 1, the best
    beam of `LLM.beam_search` (transformers' rules, length_penalty 1, early_stopping False: its defaults, which
    the BLIP-2 paper's beam-5 evaluation used through LAVIS)."""
    from fovea import BeamSearchParams, SamplingParams

    requests = [{"prompt": p, "multi_modal_data": {"image": img}} for img, p in zip(images, prompts, strict=True)]
    if num_beams > 1:
        outs = llm.beam_search(requests, BeamSearchParams(beam_width=num_beams, max_tokens=max_tokens))
        return [out.sequences[0].text.strip() for out in outs]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [out.outputs[0].text.strip() for out in llm.generate(requests, params, use_tqdm=False)]


@dataclass(slots=True)
class CaptionResult:
    num_images: int
    scores: dict[str, float]
    """"bleu4", "cider_d", "exact_match"."""
    chance: dict[str, float]
    predictions: list[str] = field(repr=False)

    def format(self) -> str:
        return "\n".join([f"captioning {self.num_images} images", f"{'':10}{'BLEU-4':>10}{'CIDEr-D':>10}{'exact':>10}",
                          *(f"{label:10}{v['bleu4']:10.3f}{v['cider_d']:10.3f}{100 * v['exact_match']:9.1f}%"
                            for label, v in (("model", self.scores), ("chance", self.chance)))])


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    return {"bleu4": bleu(predictions, references), "cider_d": cider_d(predictions, references),
            "exact_match": exact_match(predictions, references)}


def evaluate_captions(llm, items: list[EvalImage], prompt: str = "", max_tokens: int = 30,
                      num_beams: int = 1) -> CaptionResult:
    items = [item for item in items if item.captions]
    if not items:
        raise ValueError("no captions to compare with")
    predictions = generate(llm, [item.load() for item in items], [prompt] * len(items), max_tokens, num_beams)
    references = [item.captions for item in items]
    most_common = Counter(c for refs in references for c in refs).most_common(1)[0][0]
    return CaptionResult(num_images=len(items), scores=caption_scores(predictions, references),
                         chance=caption_scores([most_common] * len(items), references), predictions=predictions)


@dataclass(slots=True)
class VqaResult:
    num_questions: int
    accuracy: float
    chance: float
    by_type: dict[str, tuple[float, float, int]]
    """type -> (accuracy, chance, number of questions)."""
    predictions: list[str] = field(repr=False)

    def format(self) -> str:
        lines = [f"VQA on {self.num_questions} questions: accuracy {100 * self.accuracy:.1f}% "
                 f"(chance {100 * self.chance:.1f}%)"]
        lines += [f"  {name:12} {100 * acc:5.1f}%  (chance {100 * ch:5.1f}%, {n} questions)"
                  for name, (acc, ch, n) in sorted(self.by_type.items())]
        return "\n".join(lines)


def evaluate_vqa(llm, items: list[EvalImage], prompt_template: str = VQA_PROMPT, max_tokens: int = 5,
                 num_beams: int = 1) -> VqaResult:
    questions = [(item, q) for item in items for q in item.questions]
    if not questions:
        raise ValueError("no questions")
    images = {id(item): item.load() for item, _ in questions}
    predictions = generate(llm, [images[id(item)] for item, _ in questions],
                           [prompt_template.format(q["question"]) for _, q in questions], max_tokens, num_beams)
    answers = [q["answers"] for _, q in questions]
    kinds = [q["type"] or q["question"] for _, q in questions]
    prior = {}
    for kind in set(kinds):
        counts = Counter(normalize_answer(a) for k, refs in zip(kinds, answers) if k == kind for a in refs)
        prior[kind] = counts.most_common(1)[0][0]
    guesses = [prior[k] for k in kinds]
    by_type = {}
    for kind in sorted({q["type"] for _, q in questions if q["type"]}):
        rows = [i for i, (_, q) in enumerate(questions) if q["type"] == kind]
        by_type[kind] = (vqa_accuracy([predictions[i] for i in rows], [answers[i] for i in rows]),
                         vqa_accuracy([guesses[i] for i in rows], [answers[i] for i in rows]), len(rows))
    return VqaResult(num_questions=len(questions), accuracy=vqa_accuracy(predictions, answers),
                     chance=vqa_accuracy(guesses, answers), by_type=by_type, predictions=predictions)
