"""Where one fovea run's time goes, phase by phase, with the FLOPs and bytes each phase moves.

`PhaseRecorder(llm)` wraps a live `fovea.LLM` from the outside (module hooks and instance attributes on the
runner; nothing in fovea changes, so nothing costs anything when no recorder is attached) and `remove()`s the
wrappers afterwards. Phases, each a partition of the run's wall time:

- vision tower: the runner's encoder call (the whole multimodal encoder: ViT, and BLIP-2's Q-Former and
  projection; Qwen2.5-VL's patch merger);
- LM prefill: the language model's forward in steps that hold any prompt token (a step that mixes prompt chunks
  with decodes counts here whole: time cannot be split inside one forward);
- decode linears / decode attention / decode other: the forward of decode-only steps, split into the linear layers,
  the paged attention layers and the rest (norms, rotary, embeddings, residual adds);
- lm_head: `compute_logits` of every step (the rows that sample);
- sampler: the sampler call;
- scheduling / Python: the rest of the wall time (input processing and image preprocessing, scheduler, the
  runner's batch building, detokenization, output processing).

FLOPs count the linear layers (2 x rows x in x out, from each call's input shape), the attention products
(4 x heads x head_dim per query-key pair, from the step's attention metadata or the encoder's SDPA shapes) and
`lm_head`; norms, activations, rotary and convolutions are left out (a few % of the total). Bytes are what a phase
must at least move from memory: each weight once per call, the activations in and out, and for attention the K/V it
reads (activation dtype, i.e. bf16 weights are 2 bytes).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fovea.layers import encoder_attention
from fovea.layers.attention import Attention, AttentionMetadata, get_attention_metadata
from fovea.layers.linear import LinearBase

PHASES = ("vision tower", "LM prefill", "decode linears", "decode attention", "decode other", "lm_head", "sampler",
          "scheduling / Python")


@dataclass(slots=True)
class Phase:
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    calls: int = 0


@dataclass(slots=True)
class PhaseTotals:
    """The run's phases and its wall time; `finish(wall_s)` fills "scheduling / Python" with the rest."""

    phases: dict[str, Phase] = field(default_factory=lambda: {name: Phase() for name in PHASES})
    wall_s: float = 0.0
    num_steps: int = 0
    num_decode_steps: int = 0

    def finish(self, wall_s: float) -> None:
        self.wall_s = wall_s
        timed = sum(p.seconds for name, p in self.phases.items() if name != "scheduling / Python")
        self.phases["scheduling / Python"].seconds = max(0.0, wall_s - timed)


def linear_cost(rows: int, in_features: int, out_features: int, element_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one linear call on `rows` rows: the weight read once, activations in and out."""
    return 2.0 * rows * in_features * out_features, \
        float(element_bytes * (in_features * out_features + rows * (in_features + out_features)))


def paged_attention_cost(query_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int,
                         head_dim: int, element_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of causal attention over the paged cache: query row r of a chunk of q rows ending at context
    length c sees c - q + r + 1 keys; each query-key pair costs 2 x head_dim for QK and as much for PV, per head.
    Bytes: every request's K and V once, plus queries and outputs."""
    pairs = sum(q * (c - q) + q * (q + 1) // 2 for q, c in zip(query_lens, context_lens))
    flops = 4.0 * num_heads * head_dim * pairs
    kv = 2 * num_kv_heads * head_dim * sum(context_lens)
    qo = 2 * num_heads * head_dim * sum(query_lens)
    return flops, float(element_bytes * (kv + qo))


def encoder_attention_cost(q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """(FLOPs, bytes) of one bidirectional SDPA call on q [B, Tq, H, hs], k and v [B, Tk, H, hs]."""
    batch, tq, heads, hs = q.shape
    tk = k.shape[1]
    return 4.0 * batch * heads * tq * tk * hs, float(q.element_size() * batch * heads * hs * (2 * tq + 2 * tk))


def step_lens(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    """Query and context lengths of every request of a step, from its attention groups."""
    query_lens, context_lens = [], []
    for g in meta.groups:
        ctx = g.context_lens.tolist()
        if g.is_decode:
            query_lens.extend([1] * len(ctx))
        else:  # a prompt chunk: one request per group
            query_lens.append(int(g.token_index.numel()))
        context_lens.extend(ctx)
    return query_lens, context_lens


class PhaseRecorder:
    def __init__(self, llm):
        self.runner = llm.llm_engine.runner
        self.totals = PhaseTotals()
        self._stack: list[str] = []  # the phases entered, innermost last
        self._undo: list = []
        self._install()

    # ---- bookkeeping --------------------------------------------------------------------------------------

    def _add(self, name: str, seconds: float = 0.0, flops: float = 0.0, nbytes: float = 0.0) -> None:
        phase = self.totals.phases[name]
        phase.seconds += seconds
        phase.flops += flops
        phase.bytes += nbytes
        phase.calls += 1

    def _owner(self) -> str | None:
        """The phase FLOPs of a linear / attention call belong to, or None (lm_head counts its own)."""
        if not self._stack or self._stack[-1] == "lm_head":
            return None
        return self._stack[-1]

    def _timed(self, fn, phase: str | None, after=None):
        """`fn` timed into `phase` (None: the forward phase of the current step), `after(args, out)` giving the
        call's (FLOPs, bytes)."""

        def wrapper(*args, **kwargs):
            name = phase or self._forward_phase
            self._stack.append(name)
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                self._stack.pop()
            self._add(name, seconds, *(after(args, out) if after else (0.0, 0.0)))
            return out

        return wrapper

    def _wrap_method(self, obj, attr: str, phase: str | None, after=None) -> None:
        setattr(obj, attr, self._timed(getattr(obj, attr), phase, after))
        self._undo.append(lambda: delattr(obj, attr))  # the class's method shows through again

    # ---- installation -------------------------------------------------------------------------------------

    def _install(self) -> None:
        runner, model = self.runner, self.runner.model
        self._forward_phase = "LM prefill"
        # the hooks below see module calls: a Llama-family LM's decode steps call its kernels without the modules
        # (fovea.models.llama_decode), so the recorder turns that off while it is attached
        for module in model.modules():
            if getattr(module, "fused_decode", False):
                module.fused_decode = False
                self._undo.append(lambda module=module: setattr(module, "fused_decode", True))
        original_execute = runner.execute

        def execute(out):
            counts = list(out.num_scheduled_tokens.values())
            is_decode = bool(counts) and all(n == 1 for n in counts) and not out.scheduled_encoder_inputs
            self._forward_phase = "decode other" if is_decode else "LM prefill"
            self.totals.num_steps += bool(counts)
            self.totals.num_decode_steps += is_decode
            return original_execute(out)

        runner.execute = execute
        self._undo.append(lambda: delattr(runner, "execute"))
        self._wrap_method(runner, "_run_encoder", "vision tower")
        self._wrap_method(model, "forward", None)

        def logits_cost(args, out):
            hidden = args[0]
            rows, width = hidden.shape[0], hidden.shape[-1]
            return linear_cost(rows, width, out.shape[-1], hidden.element_size())

        self._wrap_method(model, "compute_logits", "lm_head", after=logits_cost)
        # `self.sampler(...)` looks __call__ up on the class: stand a timed callable in for the sampler object
        sampler = runner.sampler
        runner.sampler = self._timed(sampler, "sampler",
                                     after=lambda args, out: (0.0, float(args[0].numel() * args[0].element_size())))
        self._undo.append(lambda: setattr(runner, "sampler", sampler))

        for module in model.modules():
            if isinstance(module, LinearBase):
                self._hook(module, self._linear_cost, timed_as="decode linears")
            elif isinstance(module, Attention):
                self._hook(module, self._attention_cost, timed_as="decode attention")
        original_attend = encoder_attention.attend_heads

        def attend_heads(q, k, v, *args, **kwargs):
            owner = self._owner()
            if owner is not None:
                self._add(owner, 0.0, *encoder_attention_cost(q, k))
            return original_attend(q, k, v, *args, **kwargs)

        encoder_attention.attend_heads = attend_heads
        self._undo.append(lambda: setattr(encoder_attention, "attend_heads", original_attend))
        original_rows = Attention.forward_rows

        def forward_rows(module, q, k, v):  # a pruned last layer (SupportsOutputRows): one query per output row
            owner = self._owner()
            if owner is not None:
                ctx = get_attention_metadata().output_group.context_lens.tolist()
                self._add(owner, 0.0, *paged_attention_cost([1] * len(ctx), ctx, module.num_heads,
                                                            module.num_kv_heads, module.head_dim, q.element_size()))
            return original_rows(module, q, k, v)

        Attention.forward_rows = forward_rows
        self._undo.append(lambda: setattr(Attention, "forward_rows", original_rows))

    def _linear_cost(self, module: LinearBase, x: torch.Tensor) -> tuple[float, float]:
        rows = x.numel() // module.in_features
        return linear_cost(rows, module.in_features, module.out_features, x.element_size())

    def _attention_cost(self, module: Attention, q: torch.Tensor) -> tuple[float, float]:
        meta = get_attention_metadata()
        if not isinstance(meta, AttentionMetadata):
            return 0.0, 0.0
        query_lens, context_lens = step_lens(meta)
        return paged_attention_cost(query_lens, context_lens, module.num_heads, module.num_kv_heads,
                                    module.head_dim, q.element_size())

    def _hook(self, module: torch.nn.Module, cost, timed_as: str) -> None:
        """Count a module's FLOPs and bytes into the phase it runs in; in decode steps also take its time out of
        "decode other" into `timed_as` (its own phase)."""
        starts: list[float] = []

        def pre(mod, args):
            starts.append(time.perf_counter())

        def post(mod, args, out):
            seconds = time.perf_counter() - starts.pop()
            owner = self._owner()
            if owner is None:
                return
            flops, nbytes = cost(mod, args[0])
            if owner == "decode other":
                self._add(timed_as, seconds, flops, nbytes)
                self.totals.phases["decode other"].seconds -= seconds
            else:
                self._add(owner, 0.0, flops, nbytes)

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo.extend(h.remove for h in handles)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
