"""Where one request's time to first token goes, part by part, with the FLOPs of each part and the TTFT's FLOP bound.

`TTFTRecorder(llm)` wraps a live `fovea.LLM` from the outside (instance attributes and module hooks, removed by
`remove()`; fovea carries no instrumentation), as benchmarks/roofline_phases.py does for a whole run. The parts
partition the wall time of a request for one token (what a TTFT is):

- image preprocessing: the model's processor turning the decoded image into pixel values (resize, rescale,
  normalise: `BaseMultiModalProcessor._preprocess`);
- input processing: the rest of `InputProcessor.process` (tokenizing, hashing the image, placeholders, M-RoPE
  positions);
- vision tower: the runner's encoder call minus the part below (ViT / Qwen's windowed blocks, patch embedding);
- Q-Former / merger: BLIP-2's and InstructBLIP's `qformer` and `language_projection`, Qwen2.5-VL's patch
  `merger`, LLaVA's `multi_modal_projector`;
- LM prefill: the language model's forward over the prompt;
- lm_head: `compute_logits` (the one row that samples);
- sampler: the sampler call;
- engine / Python: the rest (LLM.generate's bookkeeping, scheduler, batch and metadata building, output
  processing, detokenizing).

Work a model does once and keeps (BLIP-2's Q-Former computes its first self-attention of the learned queries on
the first image only) is in the first request's figures only; latency.py's warm-up request does it before any
recorded one. Each part's time is exclusive: a part nested in another (preprocessing inside input processing, the Q-Former
inside the encoder) is taken out of its parent. FLOPs count linear layers (2 x rows x in x out), attention products
and lm_head, by the dtype they ran in (BLIP-2's Q-Former is float32 in every model dtype), so the bound can be
taken at each dtype's own GEMM peak as well as at the model dtype's alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from benchmarks.roofline_phases import encoder_attention_cost, linear_cost, paged_attention_cost, step_lens
from fovea.layers import encoder_attention
from fovea.layers.attention import Attention, AttentionMetadata, get_attention_metadata
from fovea.layers.linear import LinearBase

PARTS = ("image preprocessing", "input processing", "vision tower", "Q-Former / merger", "LM prefill", "lm_head",
         "sampler", "engine / Python")
# submodules whose calls are the "Q-Former / merger" part, by the last component of their name
ADAPTER_NAMES = frozenset({"qformer", "language_projection", "merger", "multi_modal_projector"})


@dataclass(slots=True)
class Part:
    seconds: float = 0.0
    flops: dict[str, float] = field(default_factory=dict)  # dtype name -> FLOPs run in it

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


@dataclass(slots=True)
class TTFTSplit:
    """One request's parts; `wall_s` its wall time (the TTFT), `finish` fills "engine / Python" with the rest."""

    parts: dict[str, Part] = field(default_factory=lambda: {name: Part() for name in PARTS})
    wall_s: float = 0.0

    def finish(self, wall_s: float) -> None:
        self.wall_s = wall_s
        timed = sum(p.seconds for name, p in self.parts.items() if name != "engine / Python")
        self.parts["engine / Python"].seconds = max(0.0, wall_s - timed)

    def flops_by_dtype(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for part in self.parts.values():
            for dtype, flops in part.flops.items():
                total[dtype] = total.get(dtype, 0.0) + flops
        return total

    def bound_s(self, gemm_gflops: dict[str, float], dtype: str | None = None) -> float:
        """The least time the FLOPs need at the GEMM peaks: every FLOP at `dtype`'s peak if given, else each at
        the peak of the dtype it ran in."""
        return sum(flops / (gemm_gflops[dtype or d] * 1e9) for d, flops in self.flops_by_dtype().items())

    def table(self, gemm_gflops: dict[str, float]) -> str:
        lines = [f"{'part':22s} {'ms':>8s} {'share':>7s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'of peak':>8s}"]
        for name, part in self.parts.items():
            flops = part.total_flops
            rate = flops / part.seconds / 1e9 if part.seconds > 0 and flops else 0.0
            least = sum(f / (gemm_gflops[d] * 1e9) for d, f in part.flops.items())
            lines.append(f"{name:22s} {part.seconds * 1e3:8.2f} {part.seconds / self.wall_s:7.1%} "
                         + (f"{flops / 1e9:8.2f} {rate:8.1f} {least / part.seconds:8.0%}" if flops else
                            f"{'-':>8s} {'-':>8s} {'-':>8s}"))
        flops = sum(self.flops_by_dtype().values())
        lines.append(f"{'TTFT (this request)':22s} {self.wall_s * 1e3:8.2f} {1:7.1%} {flops / 1e9:8.2f} "
                     f"{flops / self.wall_s / 1e9:8.1f} {self.bound_s(gemm_gflops) / self.wall_s:8.0%}")
        return "\n".join(lines)


class TTFTRecorder:
    def __init__(self, llm):
        self.engine = llm.llm_engine
        self.runner = self.engine.runner
        self.split = TTFTSplit()
        self._stack: list[list] = []  # [part, seconds of the children] per part entered, innermost last
        self._undo: list = []
        self._install()

    def _enter(self, part: str) -> None:
        self._stack.append([part, 0.0])

    def _leave(self, seconds: float) -> None:
        part, children = self._stack.pop()
        self.split.parts[part].seconds += seconds - children
        if self._stack:
            self._stack[-1][1] += seconds

    def _current(self) -> str | None:
        return self._stack[-1][0] if self._stack else None

    def _count(self, flops: float, dtype: torch.dtype) -> None:
        part = self._current()
        if part is None or part == "lm_head":  # lm_head counts its own call
            return
        counts = self.split.parts[part].flops
        name = str(dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0.0) + flops

    def _timed(self, fn, part: str, cost=None):
        def wrapper(*args, **kwargs):
            self._enter(part)
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self._leave(time.perf_counter() - start)
            if cost is not None:
                flops, dtype = cost(args, out)
                counts = self.split.parts[part].flops
                counts[dtype] = counts.get(dtype, 0.0) + flops
            return out

        return wrapper

    def _wrap_method(self, obj, attr: str, part: str, cost=None) -> None:
        had_own = attr in vars(obj)
        original = getattr(obj, attr)
        setattr(obj, attr, self._timed(original, part, cost))
        self._undo.append(lambda: setattr(obj, attr, original) if had_own else delattr(obj, attr))

    def _install(self) -> None:
        engine, runner, model = self.engine, self.runner, self.runner.model
        for module in model.modules():  # the Llama family's fused decode bypasses module hooks (not used here)
            if getattr(module, "fused_decode", False):
                module.fused_decode = False
                self._undo.append(lambda module=module: setattr(module, "fused_decode", True))
        self._wrap_method(engine.input_processor, "process", "input processing")
        if engine.processor is not None:
            self._wrap_method(engine.processor, "_preprocess", "image preprocessing")
        self._wrap_method(runner, "_run_encoder", "vision tower")
        self._wrap_method(model, "forward", "LM prefill")

        def logits_cost(args, out):
            hidden = args[0]
            return linear_cost(hidden.shape[0], hidden.shape[-1], out.shape[-1], 1)[0], \
                str(hidden.dtype).removeprefix("torch.")

        self._wrap_method(model, "compute_logits", "lm_head", cost=logits_cost)
        sampler = runner.sampler  # called as self.sampler(...): stand a timed callable in for the object
        runner.sampler = self._timed(sampler, "sampler")
        self._undo.append(lambda: setattr(runner, "sampler", sampler))

        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ADAPTER_NAMES:
                # the module and every module inside it: a model may call into its submodules directly (BLIP-2's
                # serving Q-Former starts from its kept first self-attention, past the module's own forward)
                for inner in module.modules():
                    self._hook_part(inner, "Q-Former / merger")
            if isinstance(module, LinearBase):
                self._hook_flops(module, lambda mod, x: linear_cost(x.numel() // mod.in_features, mod.in_features,
                                                                    mod.out_features, 1)[0])
            elif isinstance(module, Attention):
                self._hook_flops(module, self._paged_attention_flops)
        original_attend = encoder_attention.attend_heads

        def attend_heads(q, k, v, *args, **kwargs):
            self._count(encoder_attention_cost(q, k)[0], q.dtype)
            return original_attend(q, k, v, *args, **kwargs)

        encoder_attention.attend_heads = attend_heads
        self._undo.append(lambda: setattr(encoder_attention, "attend_heads", original_attend))
        original_rows = Attention.forward_rows

        def forward_rows(module, q, k, v):  # a pruned last layer (SupportsOutputRows): one query per output row
            ctx = get_attention_metadata().output_group.context_lens.tolist()
            self._count(paged_attention_cost([1] * len(ctx), ctx, module.num_heads, module.num_kv_heads,
                                             module.head_dim, 1)[0], q.dtype)
            return original_rows(module, q, k, v)

        Attention.forward_rows = forward_rows
        self._undo.append(lambda: setattr(Attention, "forward_rows", original_rows))

    @staticmethod
    def _paged_attention_flops(module: Attention, q: torch.Tensor) -> float:
        meta = get_attention_metadata()
        if not isinstance(meta, AttentionMetadata):
            return 0.0
        query_lens, context_lens = step_lens(meta)
        return paged_attention_cost(query_lens, context_lens, module.num_heads, module.num_kv_heads,
                                    module.head_dim, 1)[0]

    def _hook_part(self, module: torch.nn.Module, part: str) -> None:
        """Calls of `module` count into `part`, unless they run inside it already."""
        starts: list[float | None] = []

        def pre(mod, args):
            if self._current() == part:
                starts.append(None)
                return
            self._enter(part)
            starts.append(time.perf_counter())

        def post(mod, args, out):
            start = starts.pop()
            if start is not None:
                self._leave(time.perf_counter() - start)

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo.extend(h.remove for h in handles)

    def _hook_flops(self, module: torch.nn.Module, flops) -> None:
        def post(mod, args, out):
            self._count(flops(mod, args[0]), args[0].dtype)

        # first of the module's forward hooks: a LinearBase that is itself a part (language_projection) counts into
        # that part, before its own part hook has left it
        self._undo.append(module.register_forward_hook(post, prepend=True).remove)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
