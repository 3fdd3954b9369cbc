"""Neuron alignment of experts before averaging them (weight matching, as MC-SMoE does).

An expert's inner neurons can be permuted without changing it (gate/up rows and down columns
together), and two experts trained apart rarely list similar neurons in the same order, so
averaging them as they are mixes unrelated neurons. Aligning first keeps like with like.

Shapes: D hidden, I expert inner size; gate_up [2I, D] (gate rows first), down [D, I].

Steps:
1. describe neuron i by its gate row, up row and down column, concatenated [I, 3D];
2. cosine similarity between the reference expert's neurons and the other expert's [I, I];
3. match greedily: repeatedly pair the most similar unpaired neurons (a one-to-one matching);
4. permute the other expert so its neuron matched to reference neuron i sits at i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neuron_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Step 1: gate_up [2I, D], down [D, I] -> [I, 3D]."""
    gate, up = gate_up.float().chunk(2, dim=0)
    return torch.cat([gate, up, down.float().T], dim=1)


def match(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Steps 2-3: perm [I] with perm[i] = the neuron of `other` matched to neuron i of `ref`."""
    sim = F.normalize(ref, dim=1) @ F.normalize(other, dim=1).T  # [I, I]
    I = sim.shape[0]
    order = sim.reshape(-1).argsort(descending=True)
    perm = torch.full((I,), -1, dtype=torch.long)
    used = torch.zeros(I, dtype=torch.bool)
    left = I
    for flat in order.tolist():
        i, j = divmod(flat, I)
        if perm[i] < 0 and not used[j]:
            perm[i], used[j] = j, True
            left -= 1
            if left == 0:
                break
    return perm


def align(ref_gate_up: torch.Tensor, ref_down: torch.Tensor, gate_up: torch.Tensor,
          down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: the second expert with its neurons permuted to line up with the first's."""
    perm = match(neuron_features(ref_gate_up, ref_down), neuron_features(gate_up, down))
    I = down.shape[1]
    rows = torch.cat([perm, perm + I])  # gate rows, then the matching up rows
    return gate_up[rows], down[:, perm]
