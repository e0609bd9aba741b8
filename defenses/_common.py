"""Building blocks shared by the fine-tuning defenses.

- Parameter sets: which UNet or text-encoder parameters a method trains.
- The ESD training latent: a partial DDIM run that produces x_t, and the timestep t that the
  losses query the UNet at.
- ``ResumableTraining``: the step loop with a progress bar, a loss curve, checkpoints in the
  erasure's work folder and one random stream per step, so a resumed run equals an
  uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmark.generation import make_scheduler
from benchmark.models.checkpoints import load_state_dict, save_state_dict
from benchmark.models.handle import ModelHandle

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# Parameter sets

# The parameter sets of ESD's paper-era code (`train_method`), in diffusers UNet names.
# "noxattn" leaves out the cross-attention, the time-embedding MLP and the output head
# (final GroupNorm and conv_out); norms, conv_in and the resnets' time projections are trained.
UNET_PARAMETER_SETS = ("xattn", "noxattn", "selfattn", "full")
_UNET_OUTPUT_HEAD = ("conv_norm_out.", "conv_out.")
_UNET_TIME_EMBEDDING = ("time_embedding.",)

# AdvUnlearn's default set: the CLIP encoder layers and the final layer norm, without the
# token and position embeddings.
TEXT_ENCODER_PARAMETER_SETS = ("text_encoder_full",)


def unet_parameter_names(unet: torch.nn.Module, parameter_set: str) -> list[str]:
    """Return the names of the UNet parameters that ``parameter_set`` trains."""
    if parameter_set not in UNET_PARAMETER_SETS:
        raise ValueError(f"unknown UNet parameter set {parameter_set!r}; valid: {', '.join(UNET_PARAMETER_SETS)}")

    names = []
    for name, _ in unet.named_parameters():
        cross_attention = ".attn2." in name
        if parameter_set == "xattn":
            selected = cross_attention
        elif parameter_set == "selfattn":
            selected = ".attn1." in name
        elif parameter_set == "noxattn":
            selected = not (cross_attention or name.startswith(_UNET_TIME_EMBEDDING + _UNET_OUTPUT_HEAD))
        else:
            selected = True
        if selected:
            names.append(name)
    return names


def text_encoder_parameter_names(text_encoder: torch.nn.Module, parameter_set: str = "text_encoder_full") -> list[str]:
    """Return the names of the CLIP text-encoder parameters that ``parameter_set`` trains."""
    if parameter_set not in TEXT_ENCODER_PARAMETER_SETS:
        raise ValueError(f"unknown text-encoder parameter set {parameter_set!r}; "
                         f"valid: {', '.join(TEXT_ENCODER_PARAMETER_SETS)}")

    names = []
    for name, _ in text_encoder.named_parameters():
        # transformers 5 names the layers "encoder.layers.*"; older checkpoints add "text_model.".
        local = name.removeprefix("text_model.")
        if local.startswith(("encoder.layers.", "final_layer_norm.")):
            names.append(name)
    return names


def make_trainable(module: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Parameter]:
    """Freeze every parameter of ``module`` except ``names``; return the trainable ones by name."""
    if not names:
        raise ValueError(f"no parameters selected for training in {type(module).__name__}")

    module.requires_grad_(False)
    parameters = dict(module.named_parameters())
    trainable = {}
    for name in names:
        parameters[name].requires_grad_(True)
        trainable[name] = parameters[name]
    return trainable


def changed_weights(trained: torch.nn.Module, original: torch.nn.Module,
                    names: list[str]) -> dict[str, torch.Tensor]:
    """Return the parameters among ``names`` whose values differ from ``original``'s, detached."""
    original_parameters = dict(original.named_parameters())
    changed = {}
    for name, parameter in trained.named_parameters():
        if name in names and not torch.equal(parameter.detach(), original_parameters[name].detach()):
            changed[name] = parameter.detach().clone()
    return changed


# ----------------------------------------------------------------------------------------
# The ESD training latent

TIMESTEP_LABELLINGS = ("reference", "consistent")


@dataclass
class TrainingTimestep:
    """Position of one ESD-style training example on the DDIM grid.

    ``denoise_timesteps`` are the DDIM timesteps run from pure noise to reach x_t, and
    ``timestep`` is the DDPM timestep at which the losses query the UNet.
    """

    stop_index: int
    denoise_timesteps: torch.Tensor
    timestep: int


def training_scheduler(model: ModelHandle, ddim_steps: int):
    """Build a DDIM scheduler on the model's noise schedule, set to ``ddim_steps`` steps."""
    scheduler = make_scheduler(model, "ddim")
    scheduler.set_timesteps(ddim_steps)
    return scheduler


def draw_training_timestep(scheduler, generator: torch.Generator, labelling: str = "reference") -> TrainingTimestep:
    """Draw the stop index k and the UNet timestep t of one training example.

    ``reference`` reproduces ESD's paper-era sampler (and AdvUnlearn's copy of it): with N
    DDIM steps it skips the first grid entry (981 for N = 50), runs min(N - 1, N - k) steps
    and queries the UNet at t ~ U[round(1000 k / N), round(1000 (k + 1) / N)). The latent
    then sits about 2 grid steps (39-58 DDPM steps for N = 50) below the noise level t
    states. ``consistent`` runs the first k grid steps and queries at the grid timestep the
    latent has reached, as ESD's 2025 script does.
    """
    if labelling not in TIMESTEP_LABELLINGS:
        raise ValueError(f"unknown timestep labelling {labelling!r}; valid: {', '.join(TIMESTEP_LABELLINGS)}")

    grid = scheduler.timesteps
    steps = len(grid)
    stop_index = int(torch.randint(steps, (1,), generator=generator))

    if labelling == "consistent":
        return TrainingTimestep(stop_index, grid[:stop_index], int(grid[stop_index]))

    train_steps = scheduler.config.num_train_timesteps
    denoise_steps = min(steps - 1, steps - stop_index)
    low = round(stop_index / steps * train_steps)
    high = round((stop_index + 1) / steps * train_steps)
    timestep = int(torch.randint(low, high, (1,), generator=generator))
    return TrainingTimestep(stop_index, grid[1 : 1 + denoise_steps], timestep)


@torch.no_grad()
def sample_partial_ddim(model: ModelHandle, scheduler, noise: torch.Tensor, denoise_timesteps: torch.Tensor,
                        text_states: torch.Tensor, empty_states: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Denoise ``noise`` over ``denoise_timesteps`` with DDIM (eta 0) and classifier-free guidance.

    ``text_states`` has one row per latent; ``empty_states`` is one row, the empty prompt's.
    """
    batch = noise.shape[0]
    latents = noise.to(model.device, model.dtype)
    states = torch.cat([empty_states.expand(batch, -1, -1), text_states])

    for timestep in denoise_timesteps:
        noise_prediction = model.predict_noise(torch.cat([latents, latents]), timestep, states)
        noise_unconditional, noise_text = noise_prediction.chunk(2)
        noise_prediction = noise_unconditional + guidance_scale * (noise_text - noise_unconditional)
        latents = scheduler.step(noise_prediction, timestep, latents).prev_sample
    return latents


def latent_shape(model: ModelHandle, batch: int, resolution: int = 0) -> tuple[int, int, int, int]:
    """Return the latent shape of ``batch`` images at ``resolution`` pixels (0: the model's own)."""
    if not resolution:
        return model.latent_shape(batch)
    factor = model.resolution // model.latent_size
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return (batch, model.unet.config.in_channels, resolution // factor, resolution // factor)


def esd_target(original: ModelHandle, latents: torch.Tensor, timesteps: torch.Tensor, concept_states: torch.Tensor,
               empty_states: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """Compute the frozen model's negatively guided prediction eps*(x_t, "") - eta (eps*(x_t, c) - eps*(x_t, ""))."""
    with torch.no_grad():
        noise_empty = original.predict_noise(latents, timesteps, empty_states)
        noise_concept = original.predict_noise(latents, timesteps, concept_states)
    return noise_empty - negative_guidance * (noise_concept - noise_empty)


def esd_loss(trainee: ModelHandle, original: ModelHandle, latents: torch.Tensor, timesteps: torch.Tensor,
             trainee_states: torch.Tensor, concept_states: torch.Tensor, empty_states: torch.Tensor,
             negative_guidance: float) -> torch.Tensor:
    """ESD's loss: the MSE between eps_theta(x_t, c) and the frozen model's negatively guided target.

    ``trainee_states`` condition the trained model (the concept, or AdvUnlearn's adversarial
    prompt); ``concept_states`` and ``empty_states`` come from the frozen text encoder.
    """
    target = esd_target(original, latents, timesteps, concept_states, empty_states, negative_guidance)
    prediction = trainee.predict_noise(latents, timesteps, trainee_states)
    return F.mse_loss(prediction, target)


# ----------------------------------------------------------------------------------------
# Random streams and index schedules


def step_generator(seed: int, stream: str, step: int) -> torch.Generator:
    """A CPU generator for one training step, seeded from (seed, stream, step) alone."""
    digest = hashlib.sha256(f"{seed}/{stream}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def epoch_batch(count: int, batch: int, step: int, seed: int, stream: str) -> list[int]:
    """Return the indices used at ``step`` when ``count`` items are drawn ``batch`` at a time without replacement.

    Each epoch is a fresh permutation. A remainder smaller than ``batch`` is skipped, which is
    what a pool that is refilled when fewer than ``batch`` unseen items remain does.
    """
    batch = min(batch, count)
    per_epoch = count // batch
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(count, generator=step_generator(seed, f"{stream}-epoch", epoch))
    return order[position * batch : (position + 1) * batch].tolist()


# ----------------------------------------------------------------------------------------
# The training loop


def save_loss_curve(losses: list[float], path: Path, title: str) -> None:
    """Plot the loss per step to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(len(losses)), losses, linewidth=0.8)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    if losses and min(losses) > 0:
        axes.set_yscale("log")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer/{index}/{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors


def _restore_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


class TrainingInterrupted(RuntimeError):
    """Raised by a step callback to stop training; the last checkpoint stays for resuming."""


class ResumableTraining:
    """Runs ``total_steps`` training steps with checkpoints, a progress bar and a loss curve.

    Each step gets its own generator from (seed, name, step), so the random draws of a step do
    not depend on where a run started. Every ``checkpoint_every`` steps the trainable
    parameters, the optimizer state, the losses and any ``extra_state`` are written to
    ``<work_dir>/<name>-checkpoint.safetensors``. A later call with the same fingerprint
    resumes after the last saved step. The checkpoint is removed when training finishes, and
    the loss curve is saved as ``<work_dir>/<loss_curve>``.

    ``step_callback(step, loss)`` runs after each step, after any checkpoint; raising from it
    stops training there.
    """

    def __init__(
        self,
        name: str,
        *,
        parameters: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        seed: int,
        work_dir: Path | None,
        fingerprint: dict,
        checkpoint_every: int = 0,
        show_progress: bool = True,
        extra_state: tuple[Callable[[], dict[str, torch.Tensor]], Callable[[dict[str, torch.Tensor]], None]] | None = None,
        step_callback: Callable[[int, float], None] | None = None,
        loss_curve: str = "loss.png",
    ) -> None:
        self.name = name
        self.parameters = parameters
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.seed = seed
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.checkpoint_every = checkpoint_every
        self.show_progress = show_progress
        self.extra_state = extra_state
        self.step_callback = step_callback
        self.loss_curve = loss_curve
        self.losses: list[float] = []

    @classmethod
    def for_erasure(cls, name: str, context, config, *, parameters: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, total_steps: int, fingerprint: dict,
                    **options) -> "ResumableTraining":
        """Build an erasure's training from its context (seed, work folder, progress bar) and config.

        The fingerprint gets the config's resumable settings under "config". ``options`` go to
        the constructor (``extra_state``, ``step_callback``, ``loss_curve``).
        """
        return cls(
            name,
            parameters=parameters,
            optimizer=optimizer,
            total_steps=total_steps,
            seed=context.seed,
            work_dir=context.work_dir,
            fingerprint={"config": resumable_settings(config), **fingerprint},
            checkpoint_every=config.checkpoint_every,
            show_progress=context.show_progress,
            **options,
        )

    @property
    def checkpoint_path(self) -> Path | None:
        return self.work_dir / f"{self.name}-checkpoint.safetensors" if self.work_dir is not None else None

    def run(self, step_function: Callable[[int, torch.Generator], float]) -> list[float]:
        """Call ``step_function(step, generator)`` for every remaining step; return all losses."""
        start = self._resume()
        progress = tqdm(total=self.total_steps, initial=start, desc=self.name, unit="step",
                        disable=not self.show_progress)

        for step in range(start, self.total_steps):
            loss = float(step_function(step, step_generator(self.seed, self.name, step)))
            self.losses.append(loss)
            progress.set_postfix(loss=f"{loss:.4g}")
            progress.update()

            done = step + 1
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < self.total_steps:
                self._save(done)
            if self.step_callback is not None:
                self.step_callback(step, loss)
        progress.close()

        if self.work_dir is not None:
            save_loss_curve(self.losses, self.work_dir / self.loss_curve, self.name)
            self.checkpoint_path.unlink(missing_ok=True)
        return self.losses

    def _save(self, done: int) -> None:
        if self.work_dir is None:
            return
        tensors = {f"parameter/{name}": parameter.detach() for name, parameter in self.parameters.items()}
        tensors.update(_flatten_optimizer_state(self.optimizer))
        if self.extra_state is not None:
            tensors.update({f"extra/{key}": value for key, value in self.extra_state[0]().items()})
        metadata = {"step": done, "losses": self.losses, "fingerprint": self.fingerprint}
        save_state_dict(tensors, self.checkpoint_path, metadata=metadata)
        save_loss_curve(self.losses, self.work_dir / self.loss_curve, self.name)
        logger.debug("saved %s after step %d to %s", self.name, done, self.checkpoint_path)

    def _resume(self) -> int:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return 0

        metadata = _read_metadata(path)
        if metadata.get("fingerprint") != self.fingerprint:
            logger.warning("ignoring the checkpoint %s: it was written with other settings", path)
            return 0

        tensors = load_state_dict(path)
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                parameter.copy_(tensors[f"parameter/{name}"])
        _restore_optimizer_state(self.optimizer, tensors)
        if self.extra_state is not None:
            self.extra_state[1]({key.removeprefix("extra/"): value for key, value in tensors.items()
                                 if key.startswith("extra/")})
        self.losses = list(metadata["losses"])
        logger.info("resuming %s after step %d from %s", self.name, metadata["step"], path)
        return int(metadata["step"])


def _read_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        stored = handle.metadata() or {}
    return {key: json.loads(value) for key, value in stored.items()}


def resumable_settings(config: Any) -> dict:
    """Return the config as a dict without the fields that do not change results (the checkpoint interval)."""
    from benchmark.config import identity_settings

    return identity_settings(config)
