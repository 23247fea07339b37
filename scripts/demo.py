"""`make demo`: the main job, offline, on the demo model that ships with fovea.

The demo model (`demo/blip2-shapes`) is a small BLIP-2 that fovea trained itself on synthetic scenes of coloured
shapes (`make demo-model` rebuilds it from nothing; `make eval-demo` prints its held-out figures). This script
captions the example images stored with it and answers questions about one, through fovea's offline API; then it
starts `fovea serve` on the model (a subprocess on a free loopback port), sends one chat request with an image and
a question through the `openai` client, prints the answer and stops the server:

    python scripts/demo.py [--model DIR] [--no-server]
"""
from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "demo" / "blip2-shapes"
QUESTIONS = ("how many shapes are there?", "what colour is the background?")
SERVER_START_TIMEOUT_S = 120.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="BLIP-2 checkpoint with an examples/ folder")
    parser.add_argument("--no-server", action="store_true", help="skip the request through `fovea serve`")
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
    del llm  # the server loads its own copy
    return 0 if args.no_server else ask_server(args.model, examples[0], QUESTIONS[0])


def ask_server(model: Path, image: Path, question: str) -> int:
    """One chat request with an image through `fovea serve` and the openai client, as a user of the server sends it
    (the checkpoint's chat template turns the question into the model's prompt)."""
    try:
        import httpx
        import openai
    except ImportError as err:
        print(f"the server demo needs the openai client ({err}); pip install openai, or pass --no-server",
              file=sys.stderr)
        return 1
    port = _free_port()
    command = [sys.executable, "-m", "fovea.entrypoints.cli", "serve", str(model), "--port", str(port),
               "--dtype", "float32", "--log-level", "warning"]
    print(f"$ fovea serve {model} --port {port} --dtype float32")
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    print(f"the server did not come up:\n{log.read()[-3000:]}", file=sys.stderr)
                    return 1
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            log.seek(0)
            print("\n".join(line for line in log.read().splitlines() if line.startswith("chat template:")))
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
            start = time.perf_counter()
            reply = client.chat.completions.create(model=str(model), temperature=0.0, max_tokens=30, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}])
            seconds = time.perf_counter() - start
            print(f"POST /v1/chat/completions ({image.name} + {question!r}) -> "
                  f"{reply.choices[0].message.content.strip()!r}   ({seconds:.2f} s)")
        finally:
            server.terminate()
            server.wait(30)
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _references(model: Path) -> dict[str, str]:
    """Image name -> true caption, from examples/captions.json when the build wrote one."""
    path = model / "examples" / "captions.json"
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    raise SystemExit(main())
