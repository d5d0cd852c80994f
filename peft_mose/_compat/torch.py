"""torch internals: whether autograd is running a backward pass.

Activation checkpointing re-runs a layer's forward inside backward, after the model call (and its modality context)
has ended. MoSE layers then use the context of the call that built the graph, and only then:
``torch._C._current_graph_task_id()`` (what ``torch.utils.checkpoint`` itself uses) is -1 outside backward.
Checked on torch 2.6.0 and 2.13.0.
"""

from __future__ import annotations

import torch


def in_backward() -> bool:
    """True while autograd executes a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1
