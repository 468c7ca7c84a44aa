"""Stage 2 of MixedDimKV: choose one candidate dimension per token under a budget.

A multiple-choice knapsack per group (a KV head, or a whole layer when pooled):

    minimise  sum_i L[i, c_i]   subject to  sum_i cost[c_i] <= budget,  c_i in {0..D-1}

`greedy` (default, vectorised, no loop over tokens): walk each token's lower convex hull of
(cost, loss) points; take hull segments in order of loss saved per unit of cost (the exact optimum
of the LP relaxation), then spend what is left on the best single upgrades that still fit. Exact
whenever the budget is filled by whole hull segments (always the case for keep/evict with equal
costs, where it is top-k); otherwise within one token's loss of the optimum.
`exact`: dynamic programme over budget units (loops over tokens; for small instances and tests).
"""

from __future__ import annotations

import torch

# Large loss for forced tokens (window, sinks): taken before anything else.
FORCED_LOSS = 1.0e6


def _hull_segments(losses: torch.Tensor, costs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Segments of each token's lower convex hull, walking from option 0 (cost 0).

    losses [G, T, D] finite, costs [D] ascending with costs[0] == 0. Returns (slope, cost, vertex):
    slope and cost [G, T, D-1] per segment, slope -inf for segments that do not exist (no further
    gain, cost 0); vertex [G, T, D], the walk's position before the first segment (option 0) and
    after each one (unchanged after a missing segment).
    """
    g, t, d = losses.shape
    cur = torch.zeros(g, t, dtype=torch.long, device=losses.device)
    costs_f = costs.to(losses.dtype)
    # Per current option c (row) and option o (column), built once: the cost step to o (clamped,
    # as the division needs) where o lies ahead of c, else +inf. A finite loss difference over +inf
    # is +-0, never above a positive slope, so the options behind c need no -inf mask of their own:
    # wherever a segment exists (best slope > 0) its slope and option are those of the masked
    # walk, and where none does the step is discarded.
    option = torch.arange(d, device=losses.device)
    step_from = torch.where(
        option[None, :] > option[:, None], (costs_f[None, :] - costs_f[:, None]).clamp_min(1e-9), float("inf")
    )
    slopes, vertices = [], [cur]
    for _ in range(d - 1):
        cur_loss = losses.gather(-1, cur[..., None])
        slope = (cur_loss - losses) / step_from[cur]
        # max returns the first maximum, as argmax does: collinear points become separate, smaller steps.
        best, nxt = slope.max(dim=-1)
        # A walk that stopped (no positive slope) stays stopped: its vertex and so its slopes no
        # longer change, so `best > 0` alone says whether the segment exists.
        ok = best > 0
        slopes.append(torch.where(ok, best, float("-inf")))
        cur = torch.where(ok, nxt, cur)
        vertices.append(cur)
    vertex = torch.stack(vertices, -1)
    # A segment's cost is the cost step between its ends (0 where the walk stayed put).
    vertex_cost = costs[vertex]
    return torch.stack(slopes, -1), vertex_cost[..., 1:] - vertex_cost[..., :-1], vertex


def _row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Integer cumsum along the last axis of [G, L], as one flat scan minus each row's start.
    Exact (integers), so the same as torch.cumsum(x, -1); on CUDA a single 1-D scan runs as one
    device-wide scan, where the per-row kernel gives few long rows a handful of thread blocks."""
    if x.is_floating_point():
        raise TypeError("_row_cumsum is exact for integer tensors only")
    flat = torch.cumsum(x.reshape(-1), 0).view(x.shape)
    return flat - (flat[:, :1] - x[:, :1])


def allocate_greedy(losses: torch.Tensor, costs: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """losses [G, T, D] (finite, non-increasing along D), costs [D] int ascending (costs[0] = 0),
    budget [G] int. Returns the chosen option per token, [G, T] long."""
    g, t, d = losses.shape
    losses = losses.double()
    slope, seg_cost, vertex = _hull_segments(losses, costs)
    flat_slope = slope.reshape(g, -1)
    flat_cost = seg_cost.reshape(g, -1)
    # Stable: equal slopes keep token order (earlier tokens first), and a token's own segments
    # (non-increasing slopes) keep their order.
    sorted_slope, order = torch.sort(flat_slope, dim=-1, descending=True, stable=True)
    sorted_cost = flat_cost.gather(-1, order)
    taken_sorted = (sorted_slope > float("-inf")) & (_row_cumsum(sorted_cost) <= budget[:, None])
    taken = torch.zeros_like(taken_sorted).scatter(-1, order, taken_sorted).view(g, t, d - 1)
    # A token's choice is the furthest hull vertex whose segment was taken (segments are a chain
    # and the prefix of a sorted chain is a prefix of the chain): vertex[n_taken], option 0 if none.
    choice = vertex.gather(-1, taken.sum(-1, keepdim=True)).squeeze(-1)
    if d == 2:
        # Keep/evict: every segment costs costs[1] and the taken ones are a prefix of the sorted
        # order, so once one does not fit the leftover is below costs[1] and no upgrade fits.
        # The fill would only spend a host sync finding that out.
        return choice
    return _fill_leftover(losses, costs, budget, choice)


def _fill_leftover(
    losses: torch.Tensor, costs: torch.Tensor, budget: torch.Tensor, choice: torch.Tensor
) -> torch.Tensor:
    """Spend the budget left after the hull walk on single upgrades (any option, hull or not),
    best loss saved first. Each round upgrades one token per group; leftover shrinks every round."""
    g, t, d = losses.shape
    step = costs[None, :] - costs[:, None]  # cost of moving from option c (row) to option o, once
    for _ in range(4 * d + 8):
        left = budget - costs[choice].sum(-1)
        cur_loss = losses.gather(-1, choice[..., None])
        delta = step[choice]
        gain = torch.where((delta > 0) & (delta <= left[:, None, None]), cur_loss - losses, 0.0)
        # max gives the first maximum (as argmax) and its value in one reduction.
        best_gain, best = gain.view(g, -1).max(-1)
        ok = best_gain > 0
        # The one host synchronisation per round: rounds are few and each one costs more than a sync.
        if not bool(ok.any()):
            break
        tok, opt = best // d, best % d
        # A scatter of every group (unchanged where not ok) instead of a boolean-mask assignment,
        # which would synchronise again.
        new = torch.where(ok, opt, choice.gather(-1, tok[:, None]).squeeze(-1))
        choice = choice.scatter(-1, tok[:, None], new[:, None])
    return choice


def allocate_exact(losses: torch.Tensor, costs: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Exact multiple-choice knapsack by dynamic programming over integer budget units.
    Vectorised over groups and budget values; loops over tokens. Same contract as allocate_greedy."""
    g, t, d = losses.shape
    max_budget = int(budget.max().clamp_min(0))
    if t * (max_budget + 1) * g > 50_000_000:
        raise ValueError(f"exact allocation too large ({g} groups x {t} tokens x {max_budget + 1} budget units); "
                         "use solver='greedy'")
    losses = losses.double()
    inf = float("inf")
    dp = torch.zeros(g, max_budget + 1, dtype=torch.double, device=losses.device)
    choices = torch.empty(t, g, max_budget + 1, dtype=torch.long, device=losses.device)
    for i in range(t):
        cand = []
        for k in range(d):
            c = int(costs[k])
            shifted = torch.full_like(dp, inf)
            if c <= max_budget:
                shifted[:, c:] = dp[:, : max_budget + 1 - c]
            cand.append(shifted + losses[:, i, k : k + 1])
        stacked = torch.stack(cand, -1)
        dp, choices[i] = stacked.min(-1)
    # Backtrack from each group's own budget.
    u = budget.clamp_min(0).clone()
    out = torch.zeros(g, t, dtype=torch.long, device=losses.device)
    for i in range(t - 1, -1, -1):
        k = choices[i].gather(-1, u[:, None]).squeeze(-1)
        out[:, i] = k
        u = u - costs[k]
    return out


def allocate(losses: torch.Tensor, costs: torch.Tensor, budget: torch.Tensor, solver: str = "greedy") -> torch.Tensor:
    if solver == "exact":
        return allocate_exact(losses, costs, budget)
    return allocate_greedy(losses, costs, budget)


def total_loss(losses: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    return losses.double().gather(-1, choice[..., None]).squeeze(-1).sum(-1)
