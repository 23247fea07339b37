"""`make demo`: the main job, offline, on the demo model that ships with fovea.

The demo model (`demo/blip2-shapes`) is a small BLIP-2 that fovea trained itself on synthetic scenes of coloured
shapes (`make demo-model` rebuilds it from nothing; `make eval-demo` prints its held-out figures). This script
captions the example images stored with it and answers questions about one, through fovea's offline API:

    python scripts/demo.py [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "demo" / "blip2-shapes"
QUESTIONS = ("how many shapes are there?", "what colour is the background?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="BLIP-2 checkpoint with an examples/ folder")
    args = parser.parse_args(argv)
    examples = sorted((args.model / "examples").glob("*.png"))
    if not (args.model / "config.json").is_file() or not examples:
        print(f"{args.model} holds no checkpoint with examples/*.png; build it with `make demo-model`", file=sys.stderr)
        return 1

    from fovea import LLM, SamplingParams

    llm = LLM(str(args.model), dtype="float32")
    requests = [{"prompt": "", "multi_modal_data": {"image": str(path)}} for path in examples]
    requests += [{"prompt": f"Question: {q} Answer:", "multi_modal_data": {"image": str(examples[0])}}
                 for q in QUESTIONS]
    start = time.perf_counter()
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    seconds = time.perf_counter() - start
    references = _references(args.model)
    for path, out in zip(examples, outs):
        truth = references.get(path.name)
        print(f"{path.name}: {out.outputs[0].text.strip()!r}" + (f"   (truth: {truth!r})" if truth else ""))
    for question, out in zip(QUESTIONS, outs[len(examples):]):
        print(f"{examples[0].name}: {question} -> {out.outputs[0].text.strip()!r}")
    print(f"{len(outs)} requests in {seconds:.2f} s")
    return 0


def _references(model: Path) -> dict[str, str]:
    """Image name -> true caption, from examples/captions.json when the build wrote one."""
    path = model / "examples" / "captions.json"
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    raise SystemExit(main())
