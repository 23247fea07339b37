"""Tensor- and pipeline-parallel process groups (torch.distributed) for serving: see parallel_state."""
