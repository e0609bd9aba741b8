"""Training captions of the embedded default world.

Captions come from several templates. Colour and texture words are often left out so that short
prompts such as "a circle" are well conditioned, the shape word is sometimes replaced by "shape",
and some captions carry random filler words from the SD vocabulary. The filler words train
embedding rows that would otherwise keep their random initialisation, so a random token acts
like an irrelevant word, as it does in SD, rather than as strong out-of-distribution noise.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from benchmark.world.render import Scene

DROP_COLOR_PROBABILITY = 0.35
DROP_TEXTURE_PROBABILITY = 0.4
GENERIC_SHAPE_PROBABILITY = 0.08
FILLER_PROBABILITY = 0.25

TEMPLATES = (
    "a {color} {shape}{texture_suffix}",
    "a {texture} {color} {shape}",
    "a photo of a {color} {shape}{texture_suffix}",
    "a picture of a {texture} {shape}{color_suffix}",
    "an image of a {texture} {color} {shape}",
    "a {color} {shape}{pattern_suffix}",
)


@lru_cache(maxsize=1)
def filler_words() -> tuple[str, ...]:
    """Return the alphabetic whole-word tokens of the SD vocabulary, used as filler words."""
    from benchmark.tokenizer import clip_vocabulary

    vocabulary, _ = clip_vocabulary()
    words = []
    for token in vocabulary:
        if token.endswith("</w>") and re.fullmatch(r"[a-z]{3,12}", token[:-4]):
            words.append(token[:-4])
    return tuple(sorted(words))


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = text.replace(" ,", ",")
    return text.replace("a image", "an image") if text.startswith("a image") else text


def caption_for(scene: Scene, rng: np.random.Generator, use_filler: bool = True,
                filler_probability: float = FILLER_PROBABILITY, filler_at_end_only: bool = False) -> str:
    """Write a random caption for ``scene``.

    Filler words go before or after the caption; with ``filler_at_end_only`` always after it, so
    the causal text encoder's states for the caption's own words never see them.
    """
    color = "" if rng.random() < DROP_COLOR_PROBABILITY else scene.color
    texture = "" if rng.random() < DROP_TEXTURE_PROBABILITY else scene.texture
    shape = "shape" if rng.random() < GENERIC_SHAPE_PROBABILITY else scene.shape

    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    text = template.format(
        color=color,
        shape=shape,
        texture=texture,
        texture_suffix=f", {texture}" if texture else "",
        color_suffix=f" in {color}" if color else "",
        pattern_suffix=f" with a {texture} pattern" if texture else "",
    )
    text = _tidy(text)

    if use_filler and rng.random() < filler_probability:
        words = filler_words()
        fillers = [words[i] for i in rng.integers(len(words), size=rng.integers(1, 3))]
        before = rng.random() < 0.5
        if before and not filler_at_end_only:
            text = " ".join(fillers) + " " + text
        else:
            text = text + " " + " ".join(fillers)
    return text
