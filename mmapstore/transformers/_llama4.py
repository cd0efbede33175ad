"""Llama-4 text's MoE block, routed through the runtime's layers.

transformers 5's ``Llama4TextMoe`` does not dispatch through the experts
interface: it scales a copy of every token by every expert's router score
(zero for the experts not in its Top-K) and runs *all* experts on all of
them with one batched matmul, ``Llama4TextExperts [E, H, 2I]``.  A model
whose experts live on disk cannot do that.  This adapter gives the experts
module the interface's attributes (transposed, concatenated gate then up,
no bias, ``act(gate) * up``) and replaces the block's forward with the same
arithmetic over the routed pairs only:

- router logits, Top-K, and the sigmoid of the Top-K logits, as
  ``Llama4Router`` computes them;
- each routed pair's input is its token scaled by the pair's score (Llama-4
  scales the expert's *input*, not its output), run through the runtime's
  layer with unit weights;
- the shared expert's output plus the sum over the token's pairs.

The experts the stock block runs on zeroed inputs contribute exact zeros
(no biases), so with Top-1 (Llama-4 Scout and Maverick) the sum is the
stock one term for term; only the matmul kernels differ.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from ._backend import layer_of

__all__ = ["adapt_llama4"]

_BLOCK = "Llama4TextMoe"
_EXPERTS = "Llama4TextExperts"


def _apply_gate(self: Any, gate_up_out: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` over ``[rows, 2I]`` with gate first (the stock ``up * act(gate)``)."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    result: torch.Tensor = self.act_fn(gate) * up
    return result


def _routed_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Llama4TextMoe.forward`` over the routed pairs only (see the module docstring)."""
    hidden = hidden_states.reshape(-1, self.hidden_dim)
    # The router module itself, so that transformers' hook records its logits (output_router_logits).
    all_scores, logits = self.router(hidden)
    top_index = torch.topk(logits, self.top_k, dim=1).indices
    scores = all_scores.gather(1, top_index)
    pair_inputs = (hidden.unsqueeze(1) * scores.unsqueeze(-1)).reshape(-1, self.hidden_dim)
    unit = torch.ones((pair_inputs.shape[0], 1), dtype=pair_inputs.dtype, device=pair_inputs.device)
    layer = layer_of(self.experts)
    routed = layer.forward(pair_inputs, top_index.reshape(-1, 1), unit, router_ids=top_index)
    out: torch.Tensor = self.shared_expert(hidden)
    out.add_(routed.view(-1, self.top_k, self.hidden_dim).sum(dim=1))
    return out, logits


def adapt_llama4(model: torch.nn.Module) -> int:
    """Adapt every ``Llama4TextMoe`` block of ``model`` (built, not yet loaded);
    return how many were adapted (0 for other families)."""
    adapted = 0
    for module in model.modules():
        if type(module).__name__ != _BLOCK or type(getattr(module, "experts", None)).__name__ != _EXPERTS:
            continue
        experts: Any = module.experts
        experts.has_gate, experts.has_bias, experts.has_post_expert_norm = True, False, False
        experts.is_transposed, experts.is_concatenated = True, True
        experts._apply_gate = types.MethodType(_apply_gate, experts)
        module.forward = types.MethodType(_routed_forward, module)
        adapted += 1
    return adapted
