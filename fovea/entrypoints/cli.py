"""The `fovea` command line: `serve`, `generate`, `bench`, and `train`, `eval`, `data`.

    fovea serve path/to/model --port 8000 --api-key KEY        # the OpenAI-compatible server
    fovea serve path/to/model --num-replicas 2                 # ... as Ray Serve replicas (pip install 'fovea[ray]')
    fovea generate --image cat.png --prompt "a photo of"       # one-shot, prints the text
    fovea bench --model path/to/model --num-requests 64        # offline throughput and latency
    fovea data shapes --out data/shapes --num 1000             # a synthetic dataset (train/val/test JSONL)
    fovea train stage1 --config run.json                       # BLIP-2 training (python -m fovea.training)
    fovea eval retrieval --model runs/s1/export --data data/shapes/test.jsonl   # (python -m fovea.eval)

Engine options (`--dtype`, `--max-num-seqs`, ...) are generated from `EngineConfig`'s fields, with their
documented defaults, so the command line and `LLM(**options)` never drift apart. `train`, `eval` and `data`
hand every later word to their own package's command line. Heavy imports (torch, the server, training)
happen inside the subcommands, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from fovea.config import EngineConfig
from fovea.entrypoints.arg_utils import add_dataclass_options, dataclass_kwargs
from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.ray._require import RayNotInstalledError

# The model `generate` and `bench` use without --model: the demo BLIP-2 fovea trained on synthetic shapes and ships
# in the repository (`make demo-model` rebuilds it).
DEMO_MODEL_PATH = Path(__file__).resolve().parents[2] / "demo" / "blip2-shapes"

_MEDIA_DEFAULTS = MediaConfig()
_MEDIA_OPTIONS = [f.name for f in dataclasses.fields(MediaConfig)]  # each is `serve --name-with-dashes`
_SKIPPED_FIELDS = {"model"}  # given per subcommand (positional for serve, --model elsewhere)
_ENGINE_ALIASES = {"tensor_parallel_size": ["-tp"], "pipeline_parallel_size": ["-pp"]}  # as vLLM spells them

# Commands with their own parser in their own package: `main` hands them every word after the command before
# this parser runs. name -> (module whose main(argv) runs it, help); `data` names a generator first.
_DELEGATED = {
    "train": ("fovea.training.__main__", "train BLIP-2 (stage1, stage2) or export a checkpoint"),
    "eval": ("fovea.eval.__main__", "score a model on a JSONL split (retrieval, caption, vqa)"),
    "data": (None, "write a dataset (shapes)"),
}
_DATA_GENERATORS = {"shapes": ("fovea.training.shapes", "synthetic coloured-shape scenes with captions and "
                                                        "questions, as train/val/test JSONL")}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ---- engine options from EngineConfig ---------------------------------------------------------------------------


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (fovea.config.EngineConfig)")
    add_dataclass_options(group, EngineConfig, skip=_SKIPPED_FIELDS, aliases=_ENGINE_ALIASES)


def media_config(args: argparse.Namespace) -> MediaConfig:
    """`serve`'s media flags as the server's validated MediaConfig."""
    return MediaConfig.from_kwargs(**{name: getattr(args, name) for name in _MEDIA_OPTIONS})


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dataclass_kwargs(args, EngineConfig, skip=_SKIPPED_FIELDS)


# ---- the parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fovea", formatter_class=_HelpFormatter, description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,bench,train,eval,data}", required=True)

    serve = sub.add_parser("serve", formatter_class=_HelpFormatter, help="run the OpenAI-compatible server",
                           description="Serve MODEL over the OpenAI API: /v1/chat/completions, /v1/completions, "
                                       "/v1/models, /health, /metrics.")
    serve.add_argument("model", help="checkpoint directory (what save_pretrained writes)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--api-key", default=os.environ.get("FOVEA_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/*; also read from $FOVEA_API_KEY")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="names the API accepts in 'model', the first one reported; none: the model path")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="answer 503 while this many sequences wait to be scheduled (none: no limit)")
    serve.add_argument("--allowed-local-media-path", default=None,
                       help="directory whose files requests may name (file:// URLs or paths); none: no local files")
    serve.add_argument("--max-media-bytes", type=int, default=_MEDIA_DEFAULTS.max_media_bytes,
                       help="largest image or video a request may carry or make the server fetch (413 above)")
    serve.add_argument("--media-fetch-timeout-s", type=float, default=_MEDIA_DEFAULTS.media_fetch_timeout_s,
                       help="time limit of each http(s) media fetch, the whole download")
    serve.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                       help="the only hosts http(s) media may come from, every redirect hop included (names or IP "
                            "literals; a listed host may be on a private address); none: any public host")
    serve.add_argument("--allow-private-media-urls", action="store_true",
                       help="also fetch media from loopback, private and link-local addresses (cloud metadata "
                            "included): only on a trusted network")
    serve.add_argument("--max-image-pixels", type=int, default=_MEDIA_DEFAULTS.max_image_pixels,
                       help="largest image (width x height from its header, checked before decoding; 413 above)")
    serve.add_argument("--max-video-frame-pixels", type=int, default=_MEDIA_DEFAULTS.max_video_frame_pixels,
                       help="largest video frame (width x height from the container's header; 413 above)")
    serve.add_argument("--max-video-frames", type=int, default=_MEDIA_DEFAULTS.max_video_frames,
                       help="most frames a video file may hold (from the container; 413 above)")
    serve.add_argument("--max-video-decoded-bytes", type=int, default=_MEDIA_DEFAULTS.max_video_decoded_bytes,
                       help="most memory a video's sampled frames may take decoded (frames x width x height x 3, "
                            "checked before decoding; 413 above)")
    serve.add_argument("--media-ca-bundle", default=None, metavar="PEM",
                       help="CA certificates to check https media servers against (a private CA); none: certifi's")
    serve.add_argument("--max-concurrent-media-decodes", type=int,
                       default=_MEDIA_DEFAULTS.max_concurrent_media_decodes,
                       help="images and video headers decoded at once; other requests wait their turn")
    serve.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH", type=_lora_module,
                       help="LoRA adapters (PEFT directories) to serve, each chosen by 'model': NAME in a request "
                            "and listed by /v1/models; turns on --enable-lora")
    serve.add_argument("--chat-template", default=None,
                       help="Jinja chat template (a file, or the template itself); none: the checkpoint's own, else "
                            "fovea's fallback for the model type (BLIP-2, InstructBLIP)")
    serve.add_argument("--shutdown-timeout-s", type=float, default=None,
                       help="after SIGTERM, abort requests still running after this long (none: wait for all)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="server log level ('debug' also logs every request)")
    replicas = serve.add_argument_group(
        "Ray Serve replicas (pip install 'fovea[ray]'); giving any of these serves MODEL from replicas on Ray")
    replicas.add_argument("--num-replicas", type=int, default=None,
                          help="engine replicas behind the one endpoint, each owning an engine (with autoscaling: "
                               "the initial count)")
    replicas.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    replicas.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    replicas.add_argument("--target-ongoing-requests", type=float, default=None,
                          help="autoscaling: requests per replica Ray Serve aims at")
    replicas.add_argument("--replica-num-cpus", type=float, default=1.0,
                          help="CPUs each replica asks Ray for (its engine's --num-threads unless given)")
    replicas.add_argument("--ray-address", default=None,
                          help="the Ray cluster to join (ray.init's address); none: $RAY_ADDRESS, else a new local "
                               "Ray instance on loopback, stopped with the server")
    add_engine_options(serve)
    serve.set_defaults(handler=_serve)

    generate = sub.add_parser("generate", formatter_class=_HelpFormatter, help="generate once and print the text",
                              description="Generate from one prompt (and images) and print the text. Models with "
                                          "a chat template get the prompt and images as one user message.")
    generate.add_argument("--model", default=str(DEMO_MODEL_PATH), help="checkpoint directory")
    generate.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    generate.add_argument("--prompt", required=True, help="the prompt (or the user's message)")
    generate.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--raw-prompt", action="store_true",
                          help="send --prompt as it is, without the chat template")
    add_engine_options(generate)
    generate.set_defaults(handler=_generate)

    bench = sub.add_parser("bench", formatter_class=_HelpFormatter, help="offline throughput and latency",
                           description="Run a synthetic workload through the engine (all requests arrive at "
                                       "once) and print requests/s, tokens/s, time to first token and time "
                                       "per output token.")
    bench.add_argument("--model", default=str(DEMO_MODEL_PATH), help="checkpoint directory")
    bench.add_argument("--num-requests", type=int, default=32, help="requests in the workload")
    bench.add_argument("--input-words", type=int, default=16, help="words of text per prompt (plus the image)")
    bench.add_argument("--output-len", type=int, default=32, help="tokens generated per request (EOS ignored)")
    bench.add_argument("--image-size", type=int, default=224, help="side of each random image; 0: text only")
    bench.add_argument("--num-distinct-images", type=int, default=0,
                       help="how many different images the requests share (0: every request its own)")
    add_engine_options(bench)
    bench.set_defaults(handler=_bench)

    for name, (_, help_text) in _DELEGATED.items():  # listed for --help only: main() runs them before parsing
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _DELEGATED:
        return _run_delegated(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ValueError, TypeError, FileNotFoundError, RayNotInstalledError) as err:
        print(f"fovea {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # --cpu-kernels require and the C++ kernels did not build: the compiler's message
        from fovea.kernels import KernelBuildError

        if not isinstance(err, KernelBuildError):
            raise
        print(f"fovea {args.command}: error: {err}", file=sys.stderr)
        return 2


# ---- subcommands ----------------------------------------------------------------------------------------------


def _run_delegated(command: str, argv: list[str]) -> int:
    module = _DELEGATED[command][0]
    if command == "data":
        generators = "\n".join(f"  {name:10} {text}" for name, (_, text) in _DATA_GENERATORS.items())
        usage = f"usage: fovea data {{{','.join(_DATA_GENERATORS)}}} ...\n\ndata generators:\n{generators}\n"
        if argv and argv[0] in ("-h", "--help"):
            print(usage, end="")
            return 0
        if not argv or argv[0] not in _DATA_GENERATORS:
            given = f"unknown data generator {argv[0]!r}" if argv else "no data generator given"
            print(f"{usage}fovea data: error: {given}; available: {', '.join(_DATA_GENERATORS)}", file=sys.stderr)
            return 2
        module, argv = _DATA_GENERATORS[argv[0]][0], argv[1:]
        return importlib.import_module(module).main(argv) or 0
    return importlib.import_module(module).main(argv, prog=f"fovea {command}") or 0  # --help says `fovea train`


def _check_model_dir(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        hint = " (rebuild the demo model with `make demo-model`)" if Path(path) == DEMO_MODEL_PATH else ""
        raise FileNotFoundError(f"no checkpoint at {path}{hint}; pass --model DIR")


def _start_cpu_kernels(args: argparse.Namespace) -> str:
    """Apply --cpu-kernels before the engine starts and print which CPU paths are active, on stderr (stdout
    carries generate's text and bench's report)."""
    from fovea import kernels

    summary = kernels.configure(args.cpu_kernels).summary()
    print(summary, file=sys.stderr, flush=True)
    return summary


def _serve(args: argparse.Namespace) -> int:
    from fovea.lora.request import LoRARequest

    if any(getattr(args, name) is not None for name in _REPLICA_OPTIONS):
        return _serve_replicas(args)
    from fovea.entrypoints.media_fetch import MediaFetcher
    from fovea.entrypoints.openai.app import ServerSettings, run_server

    _check_model_dir(args.model)
    _start_cpu_kernels(args)
    settings = ServerSettings(
        served_model_names=args.served_model_name or [],
        api_key=args.api_key,
        max_waiting_requests=args.max_waiting_requests,
        chat_template=_chat_template(args),
        fetcher=MediaFetcher(media_config(args)),
        shutdown_timeout_s=args.shutdown_timeout_s,
        lora_modules=[LoRARequest(name, i, path) for i, (name, path) in enumerate(args.lora_modules or [], 1)],
    )
    options = engine_kwargs(args)
    if args.lora_modules:
        options["enable_lora"] = True
    config = EngineConfig.from_kwargs(args.model, **options)
    run_server(config, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


_REPLICA_OPTIONS = ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests")


def _serve_replicas(args: argparse.Namespace) -> int:
    """`fovea serve --num-replicas K`: the same server as K Ray Serve replicas (fovea.entrypoints.ray.serve),
    until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from fovea.entrypoints.ray import require_ray

    require_ray("fovea serve --num-replicas", "ray.serve")
    import ray
    from ray import serve

    from fovea.entrypoints.ray.serve import ReplicaScaling, ServeOptions, deploy, shutdown
    from fovea.lora.request import LoRARequest

    _check_model_dir(args.model)
    scaling = ReplicaScaling(num_replicas=args.num_replicas or 1, min_replicas=args.min_replicas,
                             max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests)
    scaling.deployment_options()  # bad counts fail before Ray starts
    server = ServeOptions(
        served_model_names=tuple(args.served_model_name or ()), api_key=args.api_key,
        max_waiting_requests=args.max_waiting_requests, chat_template=_chat_template(args),
        media=media_config(args), shutdown_timeout_s=args.shutdown_timeout_s,
        lora_modules=tuple(LoRARequest(name, i, path) for i, (name, path) in enumerate(args.lora_modules or [], 1)))
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # a single-machine instance: every Ray process on loopback (Ray's switch for that), no usage report
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(include_dashboard=False)
    # after ray.init, whose failure-signal handler would otherwise take SIGTERM (a stack dump, then an abort)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(args.model, scaling=scaling, server=server, host=args.host, port=args.port,
               replica_num_cpus=args.replica_num_cpus, **engine_kwargs(args))
        print(f"fovea serve: {args.model} on Ray Serve at http://{args.host}:{args.port}/ "
              f"({scaling.deployment_options()}); /metrics has every replica's series (label 'replica'), "
              f"/metrics/replicas their own addresses", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        shutdown()
        if not address:  # the local instance is ours: stop Serve and Ray with it
            serve.shutdown()
            ray.shutdown()
    return 0


def _chat_template(args: argparse.Namespace) -> str | None:
    if args.chat_template is not None and Path(args.chat_template).is_file():
        return Path(args.chat_template).read_text()
    return args.chat_template


def _lora_module(text: str) -> tuple[str, str]:
    """argparse type of one --lora-modules entry: NAME=PATH."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH (a LoRA module's served name and directory)")
    return name, path


def _generate(args: argparse.Namespace) -> int:
    from fovea import LLM, SamplingParams

    _check_model_dir(args.model)
    _start_cpu_kernels(args)
    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    if getattr(llm.get_tokenizer(), "chat_template", None) and not args.raw_prompt:
        parts = [{"type": "image_url", "image_url": {"url": str(Path(i).resolve())}} for i in args.image]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": args.prompt}]}]
        output = llm.chat(messages, params, use_tqdm=False)[0]
    else:
        prompt: dict[str, Any] = {"prompt": args.prompt}
        if args.image:
            prompt["multi_modal_data"] = {"image": args.image}
        output = llm.generate(prompt, params, use_tqdm=False)[0]
    print(output.outputs[0].text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    from PIL import Image

    from fovea.engine.llm_engine import LLMEngine
    from fovea.entrypoints.chat_utils import build_chat_prompt
    from fovea.sampling_params import SamplingParams

    _check_model_dir(args.model)
    if args.num_requests < 1 or args.output_len < 1:
        raise ValueError("--num-requests and --output-len must be >= 1")
    kernel_summary = _start_cpu_kernels(args)
    engine = LLMEngine(EngineConfig.from_kwargs(args.model, **engine_kwargs(args)))
    rng = np.random.default_rng(0)
    num_images = args.num_distinct_images or args.num_requests
    images = [Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
              for _ in range(num_images if args.image_size else 0)]
    tokenizer = engine.tokenizer
    prompts = []
    for i in range(args.num_requests):
        text = " ".join(rng.choice(_BENCH_WORDS, args.input_words))
        image = images[i % len(images)] if images else None
        if getattr(tokenizer, "chat_template", None):
            content = ([{"type": "image_pil", "image_pil": image}] if images else []) + [{"type": "text", "text": text}]
            prompt = build_chat_prompt(tokenizer, [{"role": "user", "content": content}],
                                       allowed_modalities=engine.mm_limits).prompt
        else:
            prompt = {"prompt": text}
            if images:
                prompt["multi_modal_data"] = {"image": image}
        prompts.append(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    engine.add_request("warmup", prompts[0], params)  # first-call costs (allocations, lazy init) stay out
    while engine.has_unfinished_requests():
        engine.step()
    if engine.config.enable_prefix_caching:
        engine.scheduler.reset_prefix_cache()  # so request 0 is not a prefix hit on the warm-up

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    first_token_s: dict[str, float] = {}
    finish_s: dict[str, float] = {}
    num_prompt_tokens = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            now = time.perf_counter() - start
            if output.outputs[0].token_ids and output.request_id not in first_token_s:
                first_token_s[output.request_id] = now
            if output.finished:
                finish_s[output.request_id] = now
                num_prompt_tokens += len(output.prompt_token_ids)
    seconds = max(finish_s.values())
    ttft = np.array([first_token_s[r] for r in finish_s]) * 1e3
    tpot = np.array([(finish_s[r] - first_token_s[r]) / max(1, args.output_len - 1) for r in finish_s]) * 1e3
    latency = np.array(list(finish_s.values()))
    num_output = args.num_requests * args.output_len

    def spread(values: np.ndarray, unit: str) -> str:
        return (f"mean {values.mean():8.2f} {unit}  p50 {np.percentile(values, 50):8.2f} {unit}  "
                f"p99 {np.percentile(values, 99):8.2f} {unit}")

    image_desc = f" + a {args.image_size}x{args.image_size} image" if images else ""
    print(f"fovea bench: {args.model}")
    print(f"  {kernel_summary}")
    print(f"  {args.num_requests} requests at once, {args.input_words} words{image_desc} each "
          f"({num_prompt_tokens / args.num_requests:.0f} prompt tokens on average), {args.output_len} output "
          f"tokens each (greedy, EOS ignored); {len(images)} distinct images")
    print(f"  {seconds:.2f} s: {args.num_requests / seconds:.2f} requests/s, {num_output / seconds:.1f} output "
          f"tokens/s, {(num_output + num_prompt_tokens) / seconds:.1f} tokens/s in all")
    print(f"  time to first token      {spread(ttft, 'ms')}")
    print(f"  time per output token    {spread(tpot, 'ms')}")
    print(f"  request latency          {spread(latency, 's')}")
    return 0


_BENCH_WORDS = ("the", "a", "photo", "of", "cat", "dog", "on", "red", "blue", "small", "large", "table", "in",
                "picture", "what", "is", "there", "two", "people", "street", "with", "and", "green", "tree")


if __name__ == "__main__":
    sys.exit(main())
