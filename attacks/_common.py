"""Building blocks shared by the prompt attacks.

Token-id layout and decoding, the projection onto the probability simplex, the straight-through
one-hot sampler, the nearest-token projection, target images made by the original model, and
noisy latents. Every random draw takes the prompt's ``torch.Generator`` (on the CPU), so an
attack's result depends on its own prompt only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.generation import Sampling, generate, to_uint8
from benchmark.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH

# Token positions between the start and end tokens of a 77-position sequence.
CONTENT_POSITIONS = MAX_LENGTH - 2


# ----------------------------------------------------------------------------------------
# Token ids


def prompt_tokens(model, prompt: str) -> tuple[list[int], int]:
    """Return the prompt's BPE ids that fit in 77 positions (no start or end token) and its full length.

    The full length counts the start and end tokens and everything a 77-position sequence cuts off.
    """
    tokenized = model.tokenize([prompt])
    ids = tokenized.input_ids[0].tolist()
    kept = ids.index(EOS_TOKEN_ID, 1) - 1
    return ids[1 : 1 + kept], tokenized.lengths[0]


def padded_ids(tokens: list[int]) -> list[int]:
    """Lay out tokens as the SD tokenizer does: start token, at most 75 tokens, end token, end-token padding."""
    body = list(tokens[:CONTENT_POSITIONS])
    return [BOS_TOKEN_ID] + body + [EOS_TOKEN_ID] * (MAX_LENGTH - 1 - len(body))


def decode_ids(tokenizer, ids: list[int]) -> str:
    """Decode a token sequence to text, dropping the leading start token and every end token.

    This is how UnlearnDiffAtk turns its optimised ids into the prompt it evaluates. BPE does
    not always round-trip, so tokenizing the text can give other ids; the runner records that.
    """
    body = list(ids[1:]) if ids and ids[0] == BOS_TOKEN_ID else list(ids)
    return tokenizer.decode([token for token in body if token != EOS_TOKEN_ID])


# ----------------------------------------------------------------------------------------
# Probability simplex (UnlearnDiffAtk)


# The reference tests "excess + 1e-8 == 0" in float32, which is true exactly when the excess is
# float32(-1e-8).
_REFERENCE_ROOT = float(np.float32(-1e-8))


def _excess(rows: torch.Tensor, shifts: list[float]) -> list[float]:
    """Return sum_j clip(row_j - shift, 0, 1) - 1 for each row and its shift, summed in the rows' dtype."""
    shift = torch.tensor(shifts, dtype=torch.float64).to(rows.dtype)
    return ((rows - shift.unsqueeze(-1)).clamp(0, 1).sum(-1) - 1).tolist()


def project_to_simplex(rows: torch.Tensor, tolerance: float = 1e-5) -> torch.Tensor:
    """Project each row onto {u : 0 <= u_j <= 1, sum_j u_j = 1} by bisection on a shift mu.

    The projection is clip(row - mu, 0, 1) with mu chosen so that the row sums to 1. As in
    UnlearnDiffAtk's reference code, the search brackets mu in [min(row) - 1, max(row)] and stops
    when the bracket is narrower than ``tolerance``. Rows therefore sum to 1 only to within about
    ``tolerance`` times their number of nonzero entries. A row whose clipped values already sum
    to 1 within ``tolerance`` is only clipped.

    Each iteration makes one vocabulary-wide pass for all rows. The bounds are Python floats
    (float64), because for a handful of rows tensor bookkeeping costs more than the pass itself.
    """
    flat = rows.detach().reshape(-1, rows.shape[-1])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("invalid rows for the simplex projection: they contain non-finite values, "
                         "so the attack's loss or gradient was not finite")
    done = ((flat.clamp(0, 1).sum(-1) - 1).abs().double() <= tolerance).tolist()
    lows = (flat.min(-1).values - 1).double().tolist()
    highs = flat.max(-1).values.double().tolist()
    # Rows that need no search keep shift 0, so they are only clipped.
    shifts = [0.0] * len(lows)
    # The excess at each bound is carried along when the bound moves to the middle.
    excess_lows, excess_highs = _excess(flat, lows), _excess(flat, highs)

    while True:
        active = [not done[row] and highs[row] - lows[row] > tolerance for row in range(len(lows))]
        if not any(active):
            break
        middles = [(low + high) / 2 for low, high in zip(lows, highs)]
        excesses = _excess(flat, middles)

        for row in (row for row in range(len(lows)) if active[row]):
            middle, excess = middles[row], excesses[row]
            shifts[row] = middle
            # Exact roots end a row's search early, as in the reference.
            if excess == 0:
                done[row] = True
            elif excess_lows[row] == _REFERENCE_ROOT:
                shifts[row], done[row] = lows[row], True
            elif excess_highs[row] == 0:
                shifts[row], done[row] = highs[row], True
            elif excess > 0:
                lows[row], excess_lows[row] = middle, excess
            elif excess < 0:
                highs[row], excess_highs[row] = middle, excess

    shift = torch.tensor(shifts, dtype=torch.float64).to(flat.dtype)
    return (flat - shift.unsqueeze(-1)).clamp(0, 1).reshape(rows.shape)


def sample_tokens(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token id per row of ``probabilities`` (rows x vocabulary) by inverting its cumulative sum.

    One uniform number per row, scaled by the row's total, is looked up in the float64 cumulative
    sum, so zero-probability tokens are never drawn and the rows need not sum to exactly 1.
    ``torch.multinomial`` draws the same distribution but spends one exponential number per
    vocabulary entry, which costs more than the rest of the sampling.
    """
    weights = probabilities.detach().double().cpu()
    cumulative = weights.cumsum(-1)
    uniform = torch.rand(weights.shape[0], 1, generator=generator, dtype=torch.float64)
    indices = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).squeeze(-1)
    return indices.clamp(max=weights.shape[-1] - 1)


class _StraightThroughOneHot(torch.autograd.Function):
    """Sample one token per row; the backward pass hands the clipped gradient to the probabilities."""

    @staticmethod
    def forward(ctx, probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        indices = sample_tokens(probabilities, generator).to(probabilities.device)
        one_hot = torch.zeros_like(probabilities)
        return one_hot.scatter_(-1, indices.unsqueeze(-1), 1.0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output.clamp(-1, 1), None


def sample_one_hot(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one-hot rows from the categorical distributions in ``probabilities`` (rows x vocabulary).

    The backward pass is the straight-through estimator of UnlearnDiffAtk: the gradient with
    respect to the one-hot matrix, clipped element-wise to [-1, 1], is the gradient with
    respect to the probabilities.
    """
    return _StraightThroughOneHot.apply(probabilities, generator)


class _OneHotEmbedding(torch.autograd.Function):
    """one_hot @ table, computed as a row lookup; the table is frozen."""

    @staticmethod
    def forward(ctx, one_hot: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table)
        return table[one_hot.argmax(-1)]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (table,) = ctx.saved_tensors
        # (table @ g^T)^T reads the row-major table in order. On one CPU thread g @ table.T measured 3x slower.
        return (table @ grad_output.T).T, None


def one_hot_embeddings(one_hot: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Return ``one_hot @ table`` for exact one-hot rows, with the gradient of the product for ``one_hot``.

    The lookup gives the same values as the product and skips a rows x vocabulary x width
    multiplication in the forward pass.
    """
    return _OneHotEmbedding.apply(one_hot, table.detach())


# ----------------------------------------------------------------------------------------
# Vocabulary projection (P4D)


def unit_rows(table: torch.Tensor) -> torch.Tensor:
    """Return the vocabulary table with each row scaled to unit length (float32), the keys of ``nearest_tokens``."""
    with torch.no_grad():
        return F.normalize(table.float(), dim=-1)


def nearest_tokens(embeddings: torch.Tensor, table: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Return the id of the vocabulary row with the highest cosine similarity to each embedding.

    ``keys`` is ``unit_rows(table)``. A loop that searches the same table every iteration passes
    it, so that the table is normalised once; the ids are the same either way.
    """
    with torch.no_grad():
        queries = F.normalize(embeddings.float(), dim=-1)
        if keys is None:
            keys = unit_rows(table)
        return (queries @ keys.T).argmax(-1)


def straight_through_projection(soft: torch.Tensor, table: torch.Tensor,
                                keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace soft embeddings by their nearest vocabulary rows in the forward pass only.

    Returns (ids, embeddings): the embeddings equal ``table[ids]``, and their gradient flows
    unchanged to ``soft``, as in PEZ-style hard-prompt optimisation. ``keys`` is as in
    ``nearest_tokens``.
    """
    ids = nearest_tokens(soft, table, keys)
    hard = table[ids].to(soft.dtype)
    return ids, soft + (hard - soft).detach()


# ----------------------------------------------------------------------------------------
# Images and latents


def render_images(model, prompt: str, seeds: list[int], guidance: float, sampler: str, steps: int) -> list[np.ndarray]:
    """Generate 8-bit images of ``prompt``, one per seed, quantised as a PNG stores them."""
    sampling = Sampling(sampler=sampler or model.default_sampler, steps=steps, resolution=model.resolution)
    images = generate(model, list(seeds), [guidance] * len(seeds), sampling, prompts=[prompt] * len(seeds))
    return [to_uint8(image) for image in images]


def encode_pixels(model, pixels: list[np.ndarray], signed_range: bool = True) -> torch.Tensor:
    """Encode 8-bit images to scaled latents with the model's VAE (posterior mean).

    With ``signed_range`` false the VAE sees values in [0, 1] instead of [-1, 1], which is how
    P4D's reference code encodes its target image.
    """
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
    if not signed_range:
        # encode_images maps x to 2x - 1, so (x + 1) / 2 reaches the VAE as x itself.
        images = (images + 1) / 2
    with torch.no_grad():
        return model.encode_images(images).float()


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse latents: sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM schedule)."""
    return scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), timesteps.to(latents.device))


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device)


def draw_timestep(generator: torch.Generator, count: int = 1000) -> int:
    return int(torch.randint(0, count, (1,), generator=generator))
