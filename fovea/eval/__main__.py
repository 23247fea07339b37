"""`python -m fovea.eval`: score a model on a JSONL split and print the figures with their chance levels.

    python -m fovea.eval retrieval --model runs/stage1/export --data shapes/test.jsonl
    python -m fovea.eval caption --model runs/stage2/export --data shapes/test.jsonl [--num-beams 5]
    python -m fovea.eval vqa --model runs/stage2/export --data shapes/test.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser(prog: str = "python -m fovea.eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{retrieval,caption,vqa}")
    tasks = {"retrieval": "recall@1/5/10 image->text and text->image (stage-1 model)",
             "caption": "BLEU-4, CIDEr-D and exact match of greedy or beam-search captions (stage-2 model)",
             "vqa": "VQA accuracy of greedy or beam-search answers (stage-2 model)"}
    for name, text in tasks.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--model", required=True, help="checkpoint directory (or a stage-1 training checkpoint)")
        p.add_argument("--data", required=True, help="JSONL split (e.g. from `python -m fovea.training.shapes`)")
        p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
        p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
        if name == "retrieval":
            p.add_argument("--k-rerank", type=int, default=16, help="ITC candidates ITM re-ranks per query")
        else:
            p.add_argument("--max-tokens", type=int, default=30 if name == "caption" else 5)
            p.add_argument("--dtype", default="auto", help="engine dtype (auto, float32, bfloat16)")
            p.add_argument("--num-beams", type=int, default=1,
                           help="beam search with this many beams (1: greedy); the BLIP-2 paper captions with 5")
        if name == "caption":
            p.add_argument("--prompt", default="", help="text before the caption (default: none)")
        if name == "vqa":
            p.add_argument("--prompt-template", default="Question: {} Answer:", help="{} is the question")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m fovea.eval") -> int:
    args = build_parser(prog).parse_args(argv)
    from fovea.eval.data import read_eval_images

    items = read_eval_images(args.data, args.max_images)
    if args.command == "retrieval":
        from fovea.eval.retrieval import evaluate_retrieval
        from fovea.training.scoring import ImageTextScorer

        result = evaluate_retrieval(ImageTextScorer.from_pretrained(args.model), items, args.k_rerank)
        figures = {"itc": result.itc, "reranked": result.reranked, "chance": result.chance}
    else:
        from fovea import LLM
        from fovea.eval.generation import evaluate_captions, evaluate_vqa

        llm = LLM(args.model, dtype=args.dtype)
        if args.command == "caption":
            result = evaluate_captions(llm, items, args.prompt, args.max_tokens, args.num_beams)
            figures = {"scores": result.scores, "chance": result.chance}
        else:
            result = evaluate_vqa(llm, items, args.prompt_template, args.max_tokens, args.num_beams)
            figures = {"accuracy": result.accuracy, "chance": result.chance, "by_type": result.by_type}
    print(result.format())
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
