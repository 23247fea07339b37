"""A test build of Qwen2.5-VL that raises inside the model: its forward fails whenever the checkpoint's
`fault_token_id` (an extra key the test writes into config.json) is among the step's input ids, and never
samples that token, so only a prompt holding it raises. Registered
under its own architecture name, so the real model class is untouched for every other test in the process.

    make_faulty(model_dir, token_id)   # config.json: architectures + fault_token_id
    register(); unregister()           # in-process; `python -m tests.e2e.faulty_model serve ...` for a server
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.models import registry
from fovea.models.registry import register_model

ARCHITECTURE = "FaultyQwen2_5_VLForConditionalGeneration"


class InjectedFault(RuntimeError):
    pass


class FaultyQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        self.fault_token_id = int(config.fault_token_id)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is not None and bool((input_ids == self.fault_token_id).any()):
            raise InjectedFault(f"injected fault: token {self.fault_token_id} reached the forward")
        return super().forward(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # never sampled, so only a prompt that holds the token raises (greedy answers that avoid it are unchanged)
        logits = super().compute_logits(hidden_states)
        logits[:, self.fault_token_id] = float("-inf")
        return logits


def register() -> None:
    register_model(ARCHITECTURE, "tests.e2e.faulty_model:FaultyQwen2_5_VL")


def unregister() -> None:
    """Leave the registry as other tests expect it (it is process-wide)."""
    registry._MODELS.pop(ARCHITECTURE, None)


def make_faulty(model_dir: str | Path, token_id: int) -> Path:
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [ARCHITECTURE]
    config["fault_token_id"] = token_id
    path.write_text(json.dumps(config, indent=2))
    return Path(model_dir)


if __name__ == "__main__":  # `fovea` with the faulty model registered: python -m tests.e2e.faulty_model serve ...
    register()
    from fovea.entrypoints.cli import main

    sys.exit(main(sys.argv[1:]))
