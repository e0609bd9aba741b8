"""Train the embedded default world from scratch on a CPU.

    python -m benchmark.world.train --work-dir .world-build --output benchmark/world/weights

Stages run in order and each one caches its result in the work folder, so an interrupted
build continues where it stopped: render the training images, train the VAE, train the
attribute classifier, encode the images to latents, train the UNet and the text encoder
jointly (resumable from its last checkpoint), and export a diffusers pipeline folder plus the
classifier. All randomness comes from ``--seed``. One thread is the default because two
threads on a 2-core machine ran several times slower than one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmark.world import architecture
from benchmark.world.captions import caption_for
from benchmark.world.classifier import HEADS, AttributeClassifier
from benchmark.world.render import (
    COLORS, SHAPES, TEXTURES, Scene, render_blank, render_scene, sample_scene,
)

CLASSIFIER_FILE = "classifier.safetensors"
WORLD_CARD = "world.json"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------
# Data


def render_dataset(count: int, seed: int, blank_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Render ``count`` images; image i comes from ``seed + i`` so any subset is reproducible."""
    images = np.zeros((count, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros((count, 3), dtype=np.int64)
    for index in tqdm(range(count), desc="render", mininterval=5):
        rng = np.random.default_rng(seed + index)
        if rng.random() < blank_fraction:
            image = render_blank(rng)
            labels[index] = (len(SHAPES), 0, 0)
        else:
            scene = sample_scene(rng)
            image = render_scene(scene, rng)
            labels[index] = (SHAPES.index(scene.shape), COLORS.index(scene.color), TEXTURES.index(scene.texture))
        images[index] = np.asarray(image)
    return {"images": images, "labels": labels}


def _cached_dataset(path: Path, count: int, seed: int, blank_fraction: float = 0.0) -> dict[str, np.ndarray]:
    if path.exists():
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    data = render_dataset(count, seed, blank_fraction)
    np.savez(path.with_suffix(".tmp.npz"), **data)
    path.with_suffix(".tmp.npz").rename(path)
    return data


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------------------
# VAE


def train_vae(images: np.ndarray, steps: int, seed: int):
    vae, _, _ = architecture.build_components(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

    progress = tqdm(range(steps), desc="vae", mininterval=5)
    for step in progress:
        index = torch.randint(len(images), (64,), generator=generator)
        batch = _to_tensor(images[index.numpy()]) * 2 - 1

        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / (32 * 32 * 3)
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch) + 1e-6 * kl

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray) -> np.ndarray:
    latents = []
    for start in tqdm(range(0, len(images), 256), desc="encode", mininterval=5):
        batch = _to_tensor(images[start : start + 256]) * 2 - 1
        latents.append(vae.encode(batch).latent_dist.mean.numpy().astype(np.float16))
    return np.concatenate(latents)


# ----------------------------------------------------------------------------------------
# Classifier


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and brightness jitter, so the classifier also reads blurry generated images."""
    count = len(batch)
    sigma = torch.rand(count, generator=generator) * 1.0
    radius = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-(radius[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)

    blurred = []
    for image, kernel in zip(batch, kernels):
        horizontal = F.conv2d(F.pad(image[:, None], (2, 2, 0, 0), mode="replicate"), kernel.view(1, 1, 1, 5))
        both = F.conv2d(F.pad(horizontal, (0, 0, 2, 2), mode="replicate"), kernel.view(1, 1, 5, 1))
        blurred.append(both[:, 0])
    batch = torch.stack(blurred)

    batch = batch * (1 + 0.1 * (torch.rand(count, 1, 1, 1, generator=generator) - 0.5))
    batch = batch + 0.04 * torch.rand(count, 1, 1, 1, generator=generator) * torch.randn(batch.shape, generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    batch[flip] = batch[flip].flip(-1)
    return batch.clamp(0, 1)


def _classifier_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    shape_loss = F.cross_entropy(logits["shape"], labels[:, 0])
    has_shape = labels[:, 0] < len(SHAPES)
    if not has_shape.any():
        return shape_loss
    color_loss = F.cross_entropy(logits["color"][has_shape], labels[has_shape, 1])
    texture_loss = F.cross_entropy(logits["texture"][has_shape], labels[has_shape, 2])
    return shape_loss + color_loss + texture_loss


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """Pass 8-bit images through the VAE (posterior mean) and back to 8-bit."""
    outputs = []
    for start in tqdm(range(0, len(images), 256), desc="reconstruct", mininterval=5):
        batch = _to_tensor(images[start : start + 256]) * 2 - 1
        decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
        outputs.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(outputs)


def train_classifier(data: dict[str, np.ndarray], epochs: int, seed: int,
                     reconstructions: np.ndarray | None = None, reconstruction_fraction: float = 0.0) -> AttributeClassifier:
    """Train the attribute classifier; with ``reconstructions``, that share of each batch shows
    the VAE's reconstruction of the image instead, as generated images do."""
    torch.manual_seed(seed)
    model = AttributeClassifier()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch_size = 128
    steps = epochs * (len(data["images"]) // batch_size)

    model.train()
    progress = tqdm(range(steps), desc="classifier", mininterval=5)
    for step in progress:
        index = torch.randint(len(data["images"]), (batch_size,), generator=generator).numpy()
        pixels = data["images"][index]
        if reconstructions is not None:
            use = (torch.rand(batch_size, generator=generator) < reconstruction_fraction).numpy()
            pixels = np.where(use[:, None, None, None], reconstructions[index], pixels)
        batch = _augment(_to_tensor(pixels), generator)
        loss = _classifier_loss(model(batch), torch.from_numpy(data["labels"][index]))

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: AttributeClassifier, images: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Return per-attribute accuracy; colour and texture count only images that have a shape."""
    predictions = {name: [] for name in HEADS}
    for start in range(0, len(images), 500):
        logits = model(images[start : start + 500])
        for name in HEADS:
            predictions[name].append(logits[name].argmax(1))
    predicted = {name: torch.cat(values).numpy() for name, values in predictions.items()}

    has_shape = labels[:, 0] < len(SHAPES)
    return {
        "shape": float((predicted["shape"] == labels[:, 0]).mean()),
        "color": float((predicted["color"][has_shape] == labels[has_shape, 1]).mean()),
        "texture": float((predicted["texture"][has_shape] == labels[has_shape, 2]).mean()),
    }


# ----------------------------------------------------------------------------------------
# Diffusion model


def _scene_of(labels: np.ndarray) -> Scene:
    return Scene(SHAPES[labels[0]], COLORS[labels[1]], TEXTURES[labels[2]])


def _learning_rate(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def learning_rate(step: int, args) -> float:
    """Warm-up and cosine decay over the main steps, then a second cosine cycle over the extra steps."""
    if step < args.diffusion_steps:
        return _learning_rate(step, args.diffusion_steps, args.lr)
    return _learning_rate(step - args.diffusion_steps, args.extra_steps, args.extra_lr, warmup=0)


def train_diffusion(latents: np.ndarray, labels: np.ndarray, args, checkpoint: Path, scaling: float):
    from diffusers import DDPMScheduler

    from benchmark.tokenizer import build_sd_tokenizer

    tokenizer = build_sd_tokenizer()
    _, unet, text_encoder = architecture.build_components(args.seed)
    scheduler = DDPMScheduler(**{k: v for k, v in architecture.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=1e-2)
    ema_unet, ema_text_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    losses: list[float] = []
    start_step = 0

    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text_encoder.load_state_dict(state["ema_text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        losses = list(state["losses"].tolist())
        start_step = int(state["step"])
        _log(f"resuming diffusion training at step {start_step}")

    total_steps = args.diffusion_steps + args.extra_steps
    progress = tqdm(range(start_step, total_steps), desc="diffusion", mininterval=10,
                    initial=start_step, total=total_steps)
    for step in progress:
        # Every step draws from its own seed, so a resumed run repeats the uninterrupted one.
        rng = np.random.default_rng([args.seed, step])
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)

        index = rng.integers(len(latents), size=args.batch_size)
        captions = [
            "" if rng.random() < 0.1 else caption_for(_scene_of(labels[i]), rng,
                                                      filler_probability=args.filler_probability,
                                                      filler_at_end_only=args.filler_at_end_only)
            for i in index
        ]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        clean = torch.from_numpy(latents[index].astype(np.float32)) * scaling
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)

        prediction = unet(noisy, timesteps, text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(prediction, noise)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

        with torch.no_grad():
            for ema, model in ((ema_unet, unet), (ema_text_encoder, text_encoder)):
                for ema_parameter, parameter in zip(ema.parameters(), model.parameters()):
                    ema_parameter.lerp_(parameter, 1 - args.ema_decay)

        losses.append(loss.item())
        progress.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == total_steps:
            _save_checkpoint(checkpoint, step + 1, unet, text_encoder, ema_unet, ema_text_encoder, optimizer, losses)

    return ema_unet, ema_text_encoder, losses


def _save_checkpoint(path: Path, step: int, unet, text_encoder, ema_unet, ema_text_encoder, optimizer, losses) -> None:
    state = {
        "step": step,
        "unet": unet.state_dict(),
        "text_encoder": text_encoder.state_dict(),
        "ema_unet": ema_unet.state_dict(),
        "ema_text_encoder": ema_text_encoder.state_dict(),
        "optimizer": optimizer.state_dict(),
        "losses": torch.tensor(losses),
    }
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


# ----------------------------------------------------------------------------------------
# Export


def export_world(output: Path, vae, unet, text_encoder, classifier, card: dict) -> None:
    """Write a diffusers pipeline folder (fp16 weights, no tokenizer files) and the classifier."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(output / "vae")
    unet.to(torch.float16).save_pretrained(output / "unet")
    text_encoder.to(torch.float16).save_pretrained(output / "text_encoder")
    DDIMScheduler(**architecture.SCHEDULER_CONFIG).save_pretrained(output / "scheduler")

    # The tokenizer is SD v1.4's and is built from open_clip's vocabulary at load time.
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": card["versions"]["diffusers"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (output / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")

    state = {
        key: (value.to(torch.float16) if value.is_floating_point() else value).contiguous()
        for key, value in classifier.state_dict().items()
    }
    save_file(state, output / CLASSIFIER_FILE)
    card["files_sha256"] = weight_file_hashes(output)
    (output / WORLD_CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    defaults = {"default_sampler": "ddim", "default_steps": 15}
    (output / "generation_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")


def weight_file_hashes(folder: Path) -> dict[str, str]:
    """The sha256 of every safetensors file below ``folder``, by relative path."""
    from benchmark.prompts import file_sha256

    return {str(path.relative_to(folder)): file_sha256(path) for path in sorted(folder.rglob("*.safetensors"))}


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path(".world-build"), help="cache folder for stages")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "weights", help="export folder")
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--train-images", type=int, default=60000)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--classifier-images", type=int, default=36000)
    parser.add_argument("--classifier-epochs", type=int, default=4)
    parser.add_argument("--classifier-reconstruction-fraction", type=float, default=0.5,
                        help="share of classifier training images shown as VAE reconstructions")
    parser.add_argument("--held-out-images", type=int, default=5000)
    parser.add_argument("--diffusion-steps", type=int, default=6000)
    parser.add_argument("--extra-steps", type=int, default=0,
                        help="diffusion steps after the main schedule, in a second cosine cycle")
    parser.add_argument("--extra-lr", type=float, default=2.5e-4, help="peak learning rate of the extra steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the UNet and text encoder")
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--filler-probability", type=float, default=0.25,
                        help="share of captions with random filler words from the SD vocabulary")
    parser.add_argument("--filler-at-end-only", action="store_true",
                        help="put filler words after the caption only, never before it")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="diffusion steps between checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-after", choices=("data", "vae", "encode", "diffusion"),
                        help="stop after this stage; a rerun continues from the cached stages")
    parser.add_argument("--classifier-only", action="store_true",
                        help="train only the classifier, e.g. in a second process beside the main build")
    return parser.parse_args(argv)


def _classifier_stage(args, data: dict[str, np.ndarray], vae=None) -> AttributeClassifier:
    path = args.work_dir / "classifier.pt"
    classifier = AttributeClassifier()
    if path.exists():
        classifier.load_state_dict(torch.load(path, weights_only=True))
    else:
        reconstructions = None
        if args.classifier_reconstruction_fraction > 0:
            if vae is None:
                raise RuntimeError("the classifier trains on VAE reconstructions; train the VAE first "
                                   "(run without --classifier-only, or after the vae stage)")
            reconstructions = reconstruct(vae, data["images"])
        classifier = train_classifier(data, args.classifier_epochs, args.seed, reconstructions,
                                      args.classifier_reconstruction_fraction)
        torch.save(classifier.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return classifier.eval()


@torch.no_grad()
def _held_out_accuracy(classifier: AttributeClassifier, vae, held_out: dict[str, np.ndarray]) -> dict:
    images = _to_tensor(held_out["images"])
    reconstructed = []
    for start in range(0, len(images), 500):
        latents = vae.encode(images[start : start + 500] * 2 - 1).latent_dist.mean
        reconstructed.append((vae.decode(latents).sample.clamp(-1, 1) + 1) / 2)
    return {
        "rendered": classifier_accuracy(classifier, images, held_out["labels"]),
        "vae_reconstructions": classifier_accuracy(classifier, torch.cat(reconstructed), held_out["labels"]),
        "held_out_images": len(images),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings: dict[str, float] = {}

    def finish(stage: str, stage_start: float) -> bool:
        timings[stage] = round(time.time() - stage_start, 1)
        _log(f"stage {stage} done in {timings[stage]:.0f} s")
        return args.stop_after == stage

    stage_start = time.time()
    train = _cached_dataset(args.work_dir / "train.npz", args.train_images, args.seed)
    held_out = _cached_dataset(args.work_dir / "held_out.npz", args.held_out_images, args.seed + 10_000_000, blank_fraction=0.1)
    classifier_data = _cached_dataset(args.work_dir / "classifier.npz", args.classifier_images, args.seed + 20_000_000, blank_fraction=0.1)
    if finish("data", stage_start):
        return
    from diffusers import AutoencoderKL

    if args.classifier_only:
        vae_dir = args.work_dir / "vae"
        vae = AutoencoderKL.from_pretrained(vae_dir).eval() if (vae_dir / "config.json").exists() else None
        _classifier_stage(args, classifier_data, vae)
        finish("classifier", stage_start)
        return

    stage_start = time.time()
    vae_dir = args.work_dir / "vae"
    if not (vae_dir / "config.json").exists():
        train_vae(train["images"], args.vae_steps, args.seed).save_pretrained(vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    if finish("vae", stage_start):
        return

    stage_start = time.time()
    latents_path = args.work_dir / "latents.npy"
    if not latents_path.exists():
        np.save(args.work_dir / "latents.tmp.npy", encode_latents(vae, train["images"]))
        (args.work_dir / "latents.tmp.npy").rename(latents_path)
    latents = np.load(latents_path)
    scaling = float(1.0 / latents.astype(np.float32).std())
    vae.register_to_config(scaling_factor=scaling)
    _log(f"latent scaling factor {scaling:.4f}")
    if finish("encode", stage_start):
        return

    stage_start = time.time()
    unet, text_encoder, losses = train_diffusion(latents, train["labels"], args, args.work_dir / "diffusion.pt", scaling)
    if finish("diffusion", stage_start):
        return

    stage_start = time.time()
    classifier = _classifier_stage(args, classifier_data, vae)
    accuracy = _held_out_accuracy(classifier, vae, held_out)
    _log(f"classifier held-out accuracy: {json.dumps(accuracy)}")
    finish("classifier", stage_start)

    card = {
        "command": "python -m benchmark.world.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "versions": _versions(),
        "stage_seconds": timings,
        "total_seconds": round(time.time() - started, 1),
        "classifier_accuracy": accuracy,
        "diffusion_final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "vae_scaling_factor": scaling,
        "threads": args.threads,
        "machine": platform.machine(),
    }
    export_world(args.output, vae, unet, text_encoder, classifier, card)
    _log(f"exported the world to {args.output}")


if __name__ == "__main__":
    main()
