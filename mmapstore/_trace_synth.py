"""Synthetic routing traces with known properties (deterministic per seed).

Every generator routes a token to the ``top_k`` largest of per-expert
scores (log-popularity plus noise), as a softmax router's Top-K does, so
ids in a row never repeat.

- :func:`uniform_trace`: no expert is preferred; no residency policy helps.
- :func:`zipf_trace`: a fixed Zipf popularity per layer (stable skew):
  frequency-based policies should win.
- :func:`recency_trace`: a small working set that slides through the experts
  (strong temporal locality): recency (LRU) should win.
- :func:`bursty_trace`: a Zipf background with short bursts of a few
  experts.
- :func:`block_diffusion_trace`: blocks of ``tokens`` positions denoised over
  ``steps_per_block`` steps; each token's scores drift slowly within a block
  (calibrated to a target adjacent-step cosine similarity of hit vectors,
  TIDE reports 0.985) and the popularity drifts between blocks.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ._trace import Phase, Trace

__all__ = [
    "adjacent_cosine",
    "block_diffusion_trace",
    "bursty_trace",
    "recency_trace",
    "uniform_trace",
    "zipf_trace",
]


def _topk(scores: npt.NDArray[np.float64], top_k: int) -> npt.NDArray[np.int16]:
    """Ids of the ``top_k`` largest scores along the last axis (order: by id)."""
    picked = np.argpartition(-scores, top_k - 1, axis=-1)[..., :top_k]
    return np.sort(picked, axis=-1).astype(np.int16)


def _zipf_logits(rng: np.random.Generator, layers: int, experts: int, skew: float) -> npt.NDArray[np.float64]:
    ranks = np.stack([rng.permutation(experts) for _ in range(layers)]) + 1
    return -skew * np.log(ranks.astype(np.float64))


def _steps_trace(
    ids: npt.NDArray[np.int16],
    tokens: int,
    source: str,
    phase: npt.NDArray[np.int8] | None = None,
    block: npt.NDArray[np.int32] | None = None,
) -> Trace:
    """``ids`` is ``[steps, tokens, layers, top_k]``."""
    steps = ids.shape[0]
    rows = ids.reshape(steps * tokens, ids.shape[2], ids.shape[3])
    return Trace.build(rows, np.arange(steps + 1, dtype=np.int64) * tokens, phase=phase, block=block, source=source)


def _gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    return -np.log(-np.log(rng.uniform(1e-12, 1.0, size=shape)))


def uniform_trace(steps: int, layers: int, experts: int, top_k: int, tokens: int = 1, *, seed: int = 0) -> Trace:
    """Every token picks ``top_k`` distinct experts uniformly at random."""
    rng = np.random.default_rng(seed)
    scores = rng.random((steps, tokens, layers, experts))
    return _steps_trace(_topk(scores, top_k), tokens, f"uniform(seed={seed})")


def zipf_trace(
    steps: int, layers: int, experts: int, top_k: int, tokens: int = 1, *, skew: float = 1.2, seed: int = 0
) -> Trace:
    """Stable Zipf(``skew``) popularity over a random ranking per layer;
    tokens sample ``top_k`` distinct experts from it (Gumbel top-k)."""
    rng = np.random.default_rng(seed)
    logits = _zipf_logits(rng, layers, experts, skew)
    scores = logits[None, None] + _gumbel(rng, (steps, tokens, layers, experts))
    return _steps_trace(_topk(scores, top_k), tokens, f"zipf(skew={skew}, seed={seed})")


def recency_trace(
    steps: int,
    layers: int,
    experts: int,
    top_k: int,
    tokens: int = 1,
    *,
    window: int = 16,
    speed: float = 0.25,
    seed: int = 0,
) -> Trace:
    """Tokens pick from a working set of ``window`` experts that slides by
    ``speed`` experts per step along a random order of each layer: what was
    used lately is what will be used next, while long-run counts are flat."""
    rng = np.random.default_rng(seed)
    window = max(top_k, min(window, experts))
    orders = np.stack([rng.permutation(experts) for _ in range(layers)])
    ids = np.empty((steps, tokens, layers, top_k), dtype=np.int16)
    for step in range(steps):
        start = int(step * speed)
        positions = (start + np.arange(window)) % experts
        members = orders[:, positions]  # [layers, window]
        picked = _topk(rng.random((tokens, layers, window)), top_k)
        ids[step] = np.take_along_axis(members[None], picked.astype(np.int64), axis=-1)
    return _steps_trace(np.sort(ids, axis=-1), tokens, f"recency(window={window}, speed={speed}, seed={seed})")


def bursty_trace(
    steps: int,
    layers: int,
    experts: int,
    top_k: int,
    tokens: int = 1,
    *,
    skew: float = 0.8,
    burst_rate: float = 0.05,
    burst_experts: int = 4,
    burst_steps: int = 12,
    burst_boost: float = 4.0,
    seed: int = 0,
) -> Trace:
    """A Zipf background; at each step a burst starts with probability
    ``burst_rate`` (per layer), boosting ``burst_experts`` random experts by
    ``burst_boost`` in log-score for ``burst_steps`` steps."""
    rng = np.random.default_rng(seed)
    logits = _zipf_logits(rng, layers, experts, skew)
    boost_until = np.zeros((layers, experts), dtype=np.int64)
    ids = np.empty((steps, tokens, layers, top_k), dtype=np.int16)
    for step in range(steps):
        for layer in np.flatnonzero(rng.random(layers) < burst_rate):
            chosen = rng.choice(experts, size=min(burst_experts, experts), replace=False)
            boost_until[layer, chosen] = step + burst_steps
        current = logits + burst_boost * (boost_until > step)
        ids[step] = _topk(current[None] + _gumbel(rng, (tokens, layers, experts)), top_k)
    return _steps_trace(ids, tokens, f"bursty(seed={seed})")


def block_diffusion_trace(
    blocks: int,
    steps_per_block: int,
    layers: int,
    experts: int,
    top_k: int,
    tokens: int = 32,
    *,
    cosine: float = 0.985,
    skew: float = 0.6,
    spread: float = 1.0,
    block_drift: float = 0.3,
    prefill_tokens: int = 0,
    seed: int = 0,
) -> Trace:
    """Block-diffusion routing: ``blocks`` blocks of ``tokens`` positions,
    each denoised for ``steps_per_block`` steps (phase DENOISE, ``block``
    marked), optionally after one prefill step of ``prefill_tokens``.

    A token's score for each expert is the layer's log-popularity plus
    ``spread`` times a Gaussian fixed for the block (the token's own
    preference); the popularity takes a random walk from step to step whose
    step size is calibrated so the mean cosine similarity of adjacent steps'
    hit vectors (within a block) is close to ``cosine``: the hot set drifts
    slowly, so hits decay with the steps since a refresh.  Between blocks
    the popularity jumps by ``block_drift``.
    """
    rng_state = np.random.default_rng(seed).integers(1 << 62)

    def generate(epsilon: float, blocks: int, layers: int) -> Trace:
        rng = np.random.default_rng(rng_state)
        logits = _zipf_logits(rng, layers, experts, skew)
        pieces: list[npt.NDArray[np.int16]] = []
        offsets = [0]
        phases: list[int] = []
        block_marks: list[int] = []
        if prefill_tokens:
            noise = rng.standard_normal((prefill_tokens, layers, experts))
            pieces.append(_topk(logits[None] + spread * noise, top_k))
            offsets.append(prefill_tokens)
            phases.append(Phase.PREFILL)
            block_marks.append(-1)
        for number in range(blocks):
            if number:
                logits = logits + block_drift * rng.standard_normal(logits.shape)
            noise = spread * rng.standard_normal((tokens, layers, experts))
            walk = logits
            for _ in range(steps_per_block):
                pieces.append(_topk(walk[None] + noise, top_k))
                offsets.append(offsets[-1] + tokens)
                phases.append(Phase.DENOISE)
                block_marks.append(number)
                walk = walk + epsilon * rng.standard_normal(walk.shape)
        return Trace.build(
            np.concatenate(pieces),
            np.asarray(offsets, dtype=np.int64),
            phase=np.asarray(phases, dtype=np.int8),
            block=np.asarray(block_marks, dtype=np.int32),
            source=f"block_diffusion(cosine={cosine}, seed={seed})",
        )

    # Cosine falls as epsilon grows: bisect on a log scale over a small
    # sample (two blocks, two layers), then generate the whole trace.
    low, high = 1e-4, 4.0
    for _ in range(14):
        middle = float(np.sqrt(low * high))
        if adjacent_cosine(generate(middle, min(blocks, 2), min(layers, 2)), experts) >= cosine:
            low = middle
        else:
            high = middle
    return generate(low, blocks, layers)


def adjacent_cosine(trace: Trace, experts: int | None = None) -> float:
    """Mean cosine similarity of hit vectors of adjacent steps of the same
    segment (block), over layers and step pairs; 1.0 when there is no pair."""
    width = int(trace.max_expert().max()) + 1 if experts is None else experts
    counts = trace.hit_counts([width] * trace.num_layers).astype(np.float64)
    same = ~trace.segment_starts()[1:]
    if counts.shape[0] < 2 or not same.any():
        return 1.0
    left, right = counts[:-1][same], counts[1:][same]
    norms = np.linalg.norm(left, axis=-1) * np.linalg.norm(right, axis=-1)
    dots = (left * right).sum(axis=-1)
    valid = norms > 0
    return float((dots[valid] / norms[valid]).mean()) if valid.any() else 1.0
