"""The embedded default world: renderer, captions, shipped weights and prompt following."""

import json

import numpy as np
import pytest

from benchmark.paths import WORLD_WEIGHTS_DIR
from benchmark.world.captions import caption_for, filler_words
from benchmark.world.classifier import HEADS
from benchmark.world.render import COLORS, SHAPES, Scene, render, render_scene


def test_render_is_deterministic_by_seed():
    first, scene = render(7)
    second, same_scene = render(7)
    assert scene == same_scene
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert first.size == (32, 32)
    assert not np.array_equal(np.asarray(first), np.asarray(render(8)[0]))


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders_inside_the_frame(shape):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        image = np.asarray(render_scene(Scene(shape, "red", "plain"), rng)).astype(int)
        red = (image[..., 0] > 150) & (image[..., 1] < 110) & (image[..., 2] < 110)
        assert red.sum() > 40, f"{shape} seed {seed}: too few shape pixels"
        border = np.concatenate([red[0], red[-1], red[:, 0], red[:, -1]])
        assert border.sum() <= 2, f"{shape} seed {seed}: the shape touches the border"


def test_captions_name_the_scene():
    rng = np.random.default_rng(0)
    scene = Scene("star", "blue", "dotted")
    captions = [caption_for(scene, rng, use_filler=False) for _ in range(400)]
    assert all("star" in c or "shape" in c for c in captions)
    assert not any(other in c for c in captions for other in COLORS if other != "blue")
    with_colour = sum("blue" in c for c in captions) / len(captions)
    assert 0.55 < with_colour < 0.75
    assert "a star" in captions


def test_filler_words_are_whole_vocabulary_words():
    words = filler_words()
    assert len(words) > 10000
    assert all(word.isalpha() and word.islower() for word in words[:1000])


def test_world_card_records_build_and_classifier_accuracy():
    card = json.loads((WORLD_WEIGHTS_DIR / "world.json").read_text())
    assert card["command"].startswith("python -m benchmark.world.train")
    assert card["versions"]["torch"]
    for attribute in ("shape", "color", "texture"):
        assert card["classifier_accuracy"]["rendered"][attribute] >= 0.99, attribute


def test_world_weights_fit_the_size_budget():
    total = sum(path.stat().st_size for path in WORLD_WEIGHTS_DIR.rglob("*") if path.is_file())
    assert total <= 30 * 1024 * 1024


def test_classifier_reads_fresh_renders():
    from evaluators.world_classifier import WorldClassifier

    classifier = WorldClassifier(WorldClassifier.Config(batch_size=64))
    images, targets = [], []
    for seed in range(10_000_000_000, 10_000_000_060):
        image, scene = render(seed)
        images.append(np.asarray(image))
        targets.append({"shape": scene.shape, "color": scene.color, "texture": scene.texture})
    logits = classifier.logits(images)
    for attribute, labels in HEADS.items():
        predicted = [labels[i] for i in logits[attribute].argmax(1).tolist()]
        correct = sum(p == t[attribute] for p, t in zip(predicted, targets))
        assert correct >= 59, f"{attribute}: {correct}/60 fresh renders read correctly"


def test_base_model_follows_prompts_on_a_sample():
    """Re-check the recorded prompt following on 24 prompts (one image each).

    docs/world.md records about 91% for shape and colour over 600 images. Here 24 images name a
    shape and 20 a colour; with 18 or more images a true rate of 0.9 falls below 0.75 with
    probability under 3% (binomial), so a failure means a real drop.
    """
    from benchmark.concepts import resolve_concept
    from benchmark.generation import Sampling, generate, to_uint8
    from benchmark.models.loading import load_model
    from evaluators.world_classifier import WorldClassifier

    model = load_model("world")
    circle = resolve_concept("circle")
    records = circle.load_retain().records[::2][:12] + circle.load_prompts().records[:12]
    sampling = Sampling(model.default_sampler, model.default_steps, model.resolution)
    images = generate(model, [r.seed for r in records], [r.guidance for r in records], sampling,
                      prompts=[r.prompt for r in records], batch_size=12, batch_invariant=False)
    classifier = WorldClassifier(WorldClassifier.Config(batch_size=32))
    logits = classifier.logits([to_uint8(image) for image in images])

    for attribute in ("shape", "color"):
        labels = HEADS[attribute]
        named = [(i, r.extra[attribute]) for i, r in enumerate(records) if r.extra.get(attribute)]
        predicted = logits[attribute].argmax(1).tolist()
        rate = sum(labels[predicted[i]] == target for i, target in named) / len(named)
        assert rate >= 0.75, f"{attribute}: {rate:.2f} of {len(named)} images show the prompted {attribute}"
