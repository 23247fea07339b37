"""The tiny Qwen2 and its two PEFT adapters, shared by the LoRA tests (built once per session)."""
from __future__ import annotations

import pytest

from fovea import LoRARequest
from tests.lora.adapters import make_peft_adapter, merged_checkpoint
from tests.oracle.qwen2_5_vl import build_tiny_qwen2


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """(base dir, adapter name -> oracle checkpoint dir, adapter name -> LoRARequest); None is the base model."""
    root = tmp_path_factory.mktemp("lora_qwen2")
    base = build_tiny_qwen2(root / "base", seed=3)
    attn = make_peft_adapter(base, root / "attn", target_modules=["q_proj", "v_proj", "o_proj"], r=4,
                             lora_alpha=8, seed=1)
    # rank 8 with rsLoRA scaling on k (a shard of qkv_proj) and the whole MLP (gate, up: shards of gate_up_proj)
    mlp = make_peft_adapter(base, root / "mlp", target_modules=["k_proj", "gate_proj", "up_proj", "down_proj"],
                            r=8, lora_alpha=16, use_rslora=True, seed=2)
    refs = {None: str(base), "attn": str(merged_checkpoint(base, attn, root / "attn_merged")),
            "mlp": str(merged_checkpoint(base, mlp, root / "mlp_merged"))}
    loras = {None: None, "attn": LoRARequest("attn", 1, str(attn)), "mlp": LoRARequest("mlp", 2, str(mlp))}
    return base, refs, loras
