"""Generation speed options: precision with the fp32 fallback, scaled-dot-product attention, torch.compile.

Everything runs on the tiny random model on the CPU, where autocast supports bf16 and fp16.
The test that compiles the UNet for real is marked slow: a cold inductor compile of the tiny
UNet took 47 s on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.cli import main
from benchmark.config import ConfigError, build_config, config_to_dict
from benchmark.generation import GenerationConfig, Sampling, generate, generate_images, image_settings
from benchmark.runner import RunRequest, resolve

SAMPLING = Sampling(sampler="ddim", steps=3, resolution=64)
PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a green triangle"]
SEEDS = [11, 12, 13]
GUIDANCE = [5.0, 5.0, 5.0]


def nan_under_autocast(model, monkeypatch, prompt: str) -> None:
    """Make the UNet return NaN for ``prompt`` whenever CPU autocast is on, and leave fp32 untouched."""
    poisoned = model.encode_prompts([prompt])
    original = model.predict_noise

    def predict_noise(latents, timesteps, text_states):
        noise = original(latents, timesteps, text_states)
        if not torch.is_autocast_enabled("cpu"):
            return noise
        # Rows are the unconditional batch, then the conditional batch. Both rows of the prompt get NaN.
        batch = text_states.shape[0] // 2
        noise = noise.clone()
        for index in range(batch):
            if torch.equal(text_states[batch + index].unsqueeze(0), poisoned):
                noise[index] = float("nan")
                noise[batch + index] = float("nan")
        return noise

    monkeypatch.setattr(model, "predict_noise", predict_noise)


# ----------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_round_trips_through_config(precision):
    config = build_config(GenerationConfig, {"precision": precision}, "generation")
    assert config.precision == precision
    assert build_config(GenerationConfig, config_to_dict(config), "generation") == config


def test_precision_defaults_to_fp32_without_compile():
    config = GenerationConfig()
    assert config.precision == "fp32"
    assert config.compile is False


def test_invalid_precision_lists_valid_values():
    with pytest.raises(ConfigError, match="generation.precision: invalid value 'fp8'; valid: fp32, bf16, fp16"):
        build_config(GenerationConfig, {"precision": "fp8"}, "generation")


def test_precision_set_option_reaches_plan():
    resolved = resolve(RunRequest(model="tiny-random", sets=["generation.precision=bf16", "generation.compile=true"]))
    assert resolved.plan()["generation"]["precision"] == "bf16"
    assert resolved.plan()["generation"]["compile"] is True


def test_run_key_ignores_default_speed_options():
    plain = resolve(RunRequest(model="tiny-random"))
    explicit = resolve(RunRequest(model="tiny-random", sets=["generation.precision=fp32", "generation.compile=false"]))
    reduced = resolve(RunRequest(model="tiny-random", sets=["generation.precision=bf16"]))
    assert plain.run_key() == explicit.run_key()
    assert reduced.run_key() != plain.run_key()


def test_image_settings_drop_batch_size_and_defaults():
    settings = image_settings(config_to_dict(GenerationConfig(batch_size=3)))
    assert "batch_size" not in settings
    assert "precision" not in settings
    assert "compile" not in settings
    assert image_settings(config_to_dict(GenerationConfig(precision="fp16")))["precision"] == "fp16"


# ----------------------------------------------------------------------------------------
# Reduced precision and the fp32 fallback


def test_generate_rejects_unknown_precision(tiny_model):
    with pytest.raises(ValueError, match="unknown precision 'half'; valid: fp32, bf16, fp16"):
        generate(tiny_model, [1], [5.0], SAMPLING, prompts=["a circle"], precision="half")


def test_fp32_images_unchanged_by_precision_argument(tiny_model):
    default = generate(tiny_model, SEEDS, GUIDANCE, SAMPLING, prompts=PROMPTS)
    explicit = generate_images(tiny_model, SEEDS, GUIDANCE, SAMPLING, prompts=PROMPTS, precision="fp32")
    for image, generated in zip(default, explicit):
        assert np.array_equal(image, generated.pixels)
        assert generated.precision == "fp32"
        assert generated.precision_fallback is False


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_images_are_finite(tiny_model, precision):
    reference = generate(tiny_model, SEEDS, GUIDANCE, SAMPLING, prompts=PROMPTS)
    images = generate_images(tiny_model, SEEDS, GUIDANCE, SAMPLING, prompts=PROMPTS, precision=precision)
    for generated, fp32 in zip(images, reference):
        assert generated.precision == precision
        assert generated.precision_fallback is False
        assert np.isfinite(generated.pixels).all()
        assert np.abs(generated.pixels - fp32).max() < 0.1


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_non_finite_image_falls_back_to_fp32(tiny_model, monkeypatch, batch_invariant):
    reference = generate(tiny_model, SEEDS, GUIDANCE, SAMPLING, prompts=PROMPTS)
    nan_under_autocast(tiny_model, monkeypatch, PROMPTS[1])

    images = generate_images(tiny_model, SEEDS, GUIDANCE, SAMPLING, prompts=PROMPTS, precision="bf16",
                             batch_size=3, batch_invariant=batch_invariant)

    assert [image.precision_fallback for image in images] == [False, True, False]
    assert [image.precision for image in images] == ["bf16", "fp32", "bf16"]
    # The regenerated prompt runs alone, as every prompt does in a batch-invariant fp32 run.
    assert np.array_equal(images[1].pixels, reference[1])
    assert np.isfinite(images[0].pixels).all()
    assert np.isfinite(images[2].pixels).all()


def test_fallback_from_text_states(tiny_model, monkeypatch):
    states = tiny_model.encode_prompts(PROMPTS[:2])
    reference = generate(tiny_model, SEEDS[:2], GUIDANCE[:2], SAMPLING, text_states=states)
    nan_under_autocast(tiny_model, monkeypatch, PROMPTS[0])

    images = generate_images(tiny_model, SEEDS[:2], GUIDANCE[:2], SAMPLING, text_states=states, precision="fp16")

    assert [image.precision_fallback for image in images] == [True, False]
    assert np.array_equal(images[0].pixels, reference[0])


def test_runner_records_precision_fallback(tmp_path, capsys, monkeypatch):
    from benchmark.models.handle import ModelHandle

    common = ["run", "--model", "tiny-random", "--set", "run.utility=false", "--no-progress",
              "--set", "run.max_prompts=2"]
    assert main([*common, "--output", str(tmp_path / "fp32")]) == 0
    fp32_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])

    original = ModelHandle.predict_noise

    def predict_noise(self, latents, timesteps, text_states):
        noise = original(self, latents, timesteps, text_states)
        return torch.full_like(noise, float("nan")) if torch.is_autocast_enabled("cpu") else noise

    monkeypatch.setattr(ModelHandle, "predict_noise", predict_noise)
    assert main([*common, "--set", "generation.precision=bf16", "--output", str(tmp_path / "bf16")]) == 0
    bf16_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])

    records = [json.loads(line) for line in (bf16_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        for side in ("pre", "post"):
            assert record[side]["precision"] == "fp32"
            assert record[side]["precision_fallback"] is True
            name = Path(record[side]["image"]).name
            assert (bf16_dir / "images" / name).read_bytes() == (fp32_dir / "images" / name).read_bytes()

    fp32_records = [json.loads(line) for line in (fp32_dir / "records.jsonl").read_text().splitlines()]
    assert "precision_fallback" not in fp32_records[0]["pre"]


# ----------------------------------------------------------------------------------------
# Attention and torch.compile


def test_unet_attention_uses_scaled_dot_product(tiny_model, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = tiny_model.unet.attn_processors
    assert processors
    assert all(isinstance(processor, AttnProcessor2_0) for processor in processors.values())

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    states = tiny_model.encode_prompts(["a circle"])
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        tiny_model.predict_noise(torch.randn(tiny_model.latent_shape(1)), torch.tensor([500]), states)
    assert len(calls) == len(processors)


def test_compile_flag_wraps_the_unet(tiny_model, monkeypatch):
    compiled_modules = []

    def record_compile(module, *args, **kwargs):
        compiled_modules.append(module)
        return module

    monkeypatch.setattr(torch, "compile", record_compile)
    eager = generate(tiny_model, SEEDS[:1], GUIDANCE[:1], SAMPLING, prompts=PROMPTS[:1])
    wrapped = generate(tiny_model, SEEDS[:1], GUIDANCE[:1], SAMPLING, prompts=PROMPTS[:1], compile_unet=True)

    assert compiled_modules == [tiny_model.unet]
    assert np.array_equal(eager[0], wrapped[0])


def _compile_unusable_reason() -> str | None:
    try:
        compiled = torch.compile(lambda x: torch.sin(x) + 1)
        compiled(torch.zeros(2))
    except Exception as error:  # any failure means torch.compile cannot run here
        return f"torch.compile does not work on this machine: {type(error).__name__}: {error}"
    return None


@pytest.mark.slow
def test_compiled_unet_matches_eager(tiny_model):
    reason = _compile_unusable_reason()
    if reason:
        pytest.skip(reason)
    eager = generate(tiny_model, SEEDS[:1], GUIDANCE[:1], SAMPLING, prompts=PROMPTS[:1])
    compiled = generate(tiny_model, SEEDS[:1], GUIDANCE[:1], SAMPLING, prompts=PROMPTS[:1], compile_unet=True)
    again = generate(tiny_model, SEEDS[:1], GUIDANCE[:1], SAMPLING, prompts=PROMPTS[:1], compile_unet=True)

    # Inductor fuses and reorders float operations, so compiled images match eager ones closely, not bitwise.
    np.testing.assert_allclose(compiled[0], eager[0], atol=1e-4, rtol=0)
    assert np.array_equal(compiled[0], again[0])
