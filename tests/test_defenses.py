"""Tests of the ESD, FMN and AdvUnlearn defenses and of the published-checkpoint loaders.

Fast tests run on the tiny random model. Tests marked slow train on the default world
(checking that the concept is erased and other shapes are kept) or take one step on the
full-size SD v1.4 architecture.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmark.concepts import resolve_concept
from benchmark.models.checkpoints import CheckpointError
from benchmark.paths import WORLD_WEIGHTS_DIR
from benchmark.plugins import ErasureContext
from benchmark.registry import DEFENSES
from benchmark.world.model import BUDGETS_FILE
from defenses import advunlearn, fmn
from defenses._common import (
    draw_training_timestep, esd_loss, make_trainable, text_encoder_parameter_names, training_scheduler,
    unet_parameter_names,
)
from defenses.checkpoints import PublishedCheckpoint, load_component_weights

MAX_LENGTH = 77


@pytest.fixture(scope="module")
def circle():
    return resolve_concept("circle")


def erasure_context(model, concept, work_dir=None, seed=0):
    return ErasureContext(original=model, concept=concept, retain_prompts=concept.load_retain(0),
                          work_dir=work_dir, seed=seed, show_progress=False)


def run_defense(name, model, concept, work_dir=None, callback=None, **settings):
    defense_class = DEFENSES.get(name)
    defense = defense_class(defense_class.Config(**settings))
    defense.step_callback = callback
    trainee = model.copy()
    changed = defense.erase(trainee, erasure_context(model, concept, work_dir))
    return trainee, changed


def padded_ids(model, prompts):
    return model.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                           return_tensors="pt").input_ids


def changed_parameter_names(trainee, original):
    """Names ("component/parameter") whose values differ between two models, over every component."""
    names = set()
    for component in ("text_encoder", "unet", "vae"):
        reference = getattr(original, component).state_dict()
        for name, tensor in getattr(trainee, component).state_dict().items():
            if not torch.equal(tensor, reference[name]):
                names.add(f"{component}/{name}")
    return names


def names_with_gradient(module):
    return {name for name, parameter in module.named_parameters()
            if parameter.grad is not None and parameter.grad.abs().sum() > 0}


# Parameter sets of ESD's paper-era code, written out in diffusers names.
def expected_unet_set(model, parameter_set):
    names = [name for name, _ in model.unet.named_parameters()]
    if parameter_set == "xattn":
        return {name for name in names if "attn2" in name}
    if parameter_set == "noxattn":
        excluded = ("time_embedding.", "conv_norm_out.", "conv_out.")
        return {name for name in names if "attn2" not in name and not name.startswith(excluded)}
    return set(names)


# ----------------------------------------------------------------------------------------
# Defaults


def test_esd_defaults_are_reference():
    config = DEFENSES.get("esd-u").Config()
    assert config.negative_guidance == 1.0
    assert config.lr == 1e-5
    assert config.iterations == 1000
    assert config.batch_size == 1
    assert config.ddim_steps == 50
    assert config.start_guidance == 3.0
    assert config.timestep_labelling == "reference"
    assert config.sample_with == "trained"


def test_fmn_defaults_are_reference():
    config = DEFENSES.get("fmn").Config()
    assert (config.lr, config.steps, config.weight_decay, config.max_grad_norm) == (2e-6, 35, 0.01, 1.0)
    assert config.only_optimize_ca is False
    assert config.use_pooler is True
    assert (config.ti_tokens, config.ti_lr, config.ti_steps, config.ti_weight_decay) == (4, 1e-3, 500, 0.1)


def test_advunlearn_defaults_are_reference():
    config = DEFENSES.get("advunlearn").Config()
    assert config.train_method == "text_encoder_full"
    assert (config.iterations, config.lr, config.warmup_iterations) == (1000, 1e-5, 200)
    assert (config.attack_steps, config.attack_lr, config.adversarial_tokens) == (30, 1e-3, 1)
    assert (config.attack_method, config.attack_init, config.attack_every) == ("pgd", "latest", 1)
    assert config.retain_batch == 5
    assert not (config.reference_word_count or config.reference_gradient_accumulation
                or config.reference_stale_attack)


def test_advunlearn_retain_weight_by_kind():
    defense = advunlearn.AdvUnlearn()
    assert defense.retain_loss_weight("nudity") == 0.3
    assert defense.retain_loss_weight("style") == 0.5
    assert defense.retain_loss_weight("object") == 0.5
    overridden = advunlearn.AdvUnlearn(advunlearn.AdvUnlearnConfig(retain_loss_weight=0.1))
    assert overridden.retain_loss_weight("nudity") == 0.1


# ----------------------------------------------------------------------------------------
# The ESD training latent


def test_reference_timestep_labelling(tiny_model):
    scheduler = training_scheduler(tiny_model, 50)
    grid = scheduler.timesteps.tolist()
    assert grid[:2] == [981, 961]
    for seed in range(200):
        point = draw_training_timestep(scheduler, torch.Generator().manual_seed(seed), "reference")
        k = point.stop_index
        assert point.denoise_timesteps.tolist() == grid[1 : 1 + min(49, 50 - k)]
        assert 20 * k <= point.timestep <= 20 * k + 19


def test_consistent_timestep_labelling(tiny_model):
    scheduler = training_scheduler(tiny_model, 50)
    grid = scheduler.timesteps.tolist()
    for seed in range(50):
        point = draw_training_timestep(scheduler, torch.Generator().manual_seed(seed), "consistent")
        assert point.denoise_timesteps.tolist() == grid[: point.stop_index]
        assert point.timestep == grid[point.stop_index]


# ----------------------------------------------------------------------------------------
# (a) Losses against their formulas, and the trained parameter sets


def test_esd_loss_matches_formula(tiny_model):
    model, trainee = tiny_model, tiny_model.copy()
    with torch.no_grad():
        for parameter in trainee.unet.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    ids = padded_ids(model, ["circle", ""])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([437])
    eta = 1.5

    with torch.no_grad():
        concept = model.text_encoder(ids[:1]).last_hidden_state
        empty = model.text_encoder(ids[1:]).last_hidden_state
        noise_empty = model.unet(latents, timesteps, encoder_hidden_states=empty).sample
        noise_concept = model.unet(latents, timesteps, encoder_hidden_states=concept).sample
        prediction = trainee.unet(latents, timesteps, encoder_hidden_states=concept).sample
    expected = ((prediction - (noise_empty - eta * (noise_concept - noise_empty))) ** 2).mean()

    loss = esd_loss(trainee, model, latents, timesteps, concept, concept, empty, eta)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name, parameter_set", [("esd-x", "xattn"), ("esd-u", "noxattn"), ("esd-full", "full")])
def test_esd_trains_declared_parameters(tiny_model, circle, name, parameter_set):
    expected = expected_unet_set(tiny_model, parameter_set)
    assert set(unet_parameter_names(tiny_model.unet, parameter_set)) == expected

    trainee = tiny_model.copy()
    make_trainable(trainee.unet, sorted(expected))
    states = tiny_model.encode_prompts(["circle", ""])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    esd_loss(trainee, tiny_model, latents, torch.tensor([500]), states[:1], states[:1], states[1:], 1.0).backward()
    assert names_with_gradient(trainee.unet) == expected

    trainee, changed = run_defense(name, tiny_model, circle, iterations=2, ddim_steps=4, lr=1e-3)
    assert changed_parameter_names(trainee, tiny_model) == {f"unet/{n}" for n in expected}
    assert set(changed) == {"unet"}
    assert set(changed["unet"]) == expected


def test_advunlearn_loss_matches_formula(tiny_model):
    model, trainee = tiny_model, tiny_model.copy()
    with torch.no_grad():
        for parameter in trainee.text_encoder.encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    retain_latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([613])
    gamma, eta = 0.5, 1.0

    # An adversarial slot holding the embedding of a real token X equals the prompt "X circle".
    token = model.tokenizer("dog", add_special_tokens=False).input_ids[0]
    adversarial = model.token_embedding.weight[token].detach().unsqueeze(0)
    concept_ids = padded_ids(model, ["circle"])
    prompt = advunlearn.insert_adversarial_prefix(model.token_embedding(concept_ids).detach(), adversarial,
                                                  advunlearn.prompt_length(model, "circle"))
    adversarial_states = trainee.encode_word_embeddings(prompt)
    with torch.no_grad():
        expected_states = trainee.text_encoder(padded_ids(model, ["dog circle"])).last_hidden_state
    assert torch.allclose(adversarial_states, expected_states, atol=1e-5)

    retain_ids = padded_ids(model, ["a red square", "a green triangle"])
    with torch.no_grad():
        concept = model.text_encoder(concept_ids).last_hidden_state
        empty = model.text_encoder(padded_ids(model, [""])).last_hidden_state
        retain_original = model.text_encoder(retain_ids).last_hidden_state
        retain_trained = trainee.text_encoder(retain_ids).last_hidden_state
        noise_empty = model.unet(latents, timesteps, encoder_hidden_states=empty).sample
        noise_concept = model.unet(latents, timesteps, encoder_hidden_states=concept).sample
        target = noise_empty - eta * (noise_concept - noise_empty)
        unlearning = ((model.unet(latents, timesteps, encoder_hidden_states=expected_states).sample - target) ** 2).mean()
        retain_timesteps = timesteps.expand(2)
        retain_target = model.unet(retain_latents, retain_timesteps, encoder_hidden_states=retain_original).sample
        retain = ((model.unet(retain_latents, retain_timesteps, encoder_hidden_states=retain_trained).sample
                   - retain_target) ** 2).mean()
        attack = ((model.unet(latents, timesteps, encoder_hidden_states=expected_states).sample
                   - noise_concept) ** 2).mean()

    loss = esd_loss(trainee, model, latents, timesteps, adversarial_states, concept, empty, eta)
    loss = loss + gamma * advunlearn.utility_loss(trainee, model, retain_latents, retain_timesteps, retain_ids,
                                                   retain_original)
    assert torch.allclose(loss, unlearning + gamma * retain, rtol=1e-5, atol=0)
    assert torch.allclose(advunlearn.attack_loss(trainee, latents, timesteps, adversarial_states, noise_concept),
                          attack, rtol=1e-5, atol=0)


def test_advunlearn_adversarial_prefix_placement(tiny_model):
    table = tiny_model.token_embedding.weight.detach()
    ids = padded_ids(tiny_model, ["nudity"])
    nu, dity = ids[0, 1].item(), ids[0, 2].item()
    embeddings = tiny_model.token_embedding(ids).detach()
    adversarial = torch.zeros(1, table.shape[1])

    corrected = advunlearn.insert_adversarial_prefix(embeddings, adversarial, advunlearn.prompt_length(tiny_model, "nudity"))
    assert corrected.shape == embeddings.shape
    assert torch.equal(corrected[0, 2], table[nu])
    assert torch.equal(corrected[0, 3], table[dity])

    word_count = advunlearn.prompt_length(tiny_model, "nudity", word_count=True)
    reference = advunlearn.insert_adversarial_prefix(embeddings, adversarial, word_count)
    assert word_count == 1
    assert torch.equal(reference[0, 2], table[nu])
    assert torch.equal(reference[0, 3], table[tiny_model.tokenizer.eos_token_id]), "the reference drops 'dity'"


def test_advunlearn_trains_text_encoder_layers(tiny_model, circle):
    names = text_encoder_parameter_names(tiny_model.text_encoder)
    expected = {name for name, _ in tiny_model.text_encoder.named_parameters()
                if name.startswith(("encoder.layers.", "final_layer_norm."))}
    assert set(names) == expected
    assert not any(name.startswith("embeddings.") for name in names)

    trainee, changed = run_defense("advunlearn", tiny_model, circle, iterations=2, warmup_iterations=1,
                                   attack_steps=2, ddim_steps=4, retain_batch=2, lr=1e-3)
    assert changed_parameter_names(trainee, tiny_model) == {f"text_encoder/{n}" for n in expected}
    assert set(changed["text_encoder"]) == expected


def test_advunlearn_unet_option_trains_cross_attention(tiny_model, circle):
    trainee, changed = run_defense("advunlearn", tiny_model, circle, train_method="xattn", iterations=2,
                                   warmup_iterations=1, attack_steps=1, ddim_steps=4, retain_batch=2, lr=1e-3)
    expected = expected_unet_set(tiny_model, "xattn")
    assert changed_parameter_names(trainee, tiny_model) == {f"unet/{n}" for n in expected}


@pytest.mark.parametrize("settings", [
    dict(attack_method="fast_at"),
    dict(reference_gradient_accumulation=True, reference_stale_attack=True, reference_word_count=True),
    dict(attack_method="fast_at", reference_gradient_accumulation=True, attack_init="random"),
    dict(project_to_vocabulary=True),
])
def test_advunlearn_attack_options_run(tiny_model, circle, settings):
    _, changed = run_defense("advunlearn", tiny_model, circle, iterations=2, warmup_iterations=0, attack_steps=3,
                             ddim_steps=4, retain_batch=2, **settings)
    assert changed["text_encoder"]


def test_advunlearn_attack_lowers_attack_loss(tiny_model, circle):
    defense = advunlearn.AdvUnlearn(advunlearn.AdvUnlearnConfig(attack_steps=1, ddim_steps=4, attack_lr=1e-2))
    state = advunlearn._AdversarialState(tiny_model, tiny_model, defense.config, "circle", 0)
    state.adversarial = state.initial_adversarial(torch.Generator().manual_seed(0))
    start = state.adversarial.clone()
    result = defense.attack(tiny_model, tiny_model, state, torch.Generator().manual_seed(1))
    assert not torch.equal(result, start)

    stale = advunlearn.AdvUnlearn(advunlearn.AdvUnlearnConfig(attack_steps=1, ddim_steps=4,
                                                               reference_stale_attack=True))
    state.adversarial = start.clone()
    assert torch.equal(stale.attack(tiny_model, tiny_model, state, torch.Generator().manual_seed(1)), start)


def test_advunlearn_without_retain_prompts_fails(tiny_model, circle):
    defense = advunlearn.AdvUnlearn(advunlearn.AdvUnlearnConfig(iterations=1))
    context = ErasureContext(tiny_model, circle, None, None, 0, False)
    with pytest.raises(ValueError, match="retain_loss_weight=0"):
        defense.erase(tiny_model.copy(), context)


def attention_norm_by_hand(unet, latents, timesteps, states, positions):
    """The norm of every attn2 layer's softmax(QK^T / sqrt(d)) at ``positions``, from the layers' own weights."""
    inputs = []
    hooks = [module.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append((module, args[0] if args else kwargs["hidden_states"],
                                                    kwargs["encoder_hidden_states"])), with_kwargs=True)
        for name, module in unet.named_modules() if name.endswith("attn2")]
    try:
        with torch.no_grad():
            unet(latents, timesteps, encoder_hidden_states=states)
    finally:
        for hook in hooks:
            hook.remove()

    columns = []
    for module, hidden, context in inputs:
        heads = module.heads
        query = module.to_q(hidden)
        key = module.to_k(context)
        batch, pixels, width = query.shape
        query = query.view(batch, pixels, heads, width // heads).transpose(1, 2)
        key = key.view(batch, key.shape[1], heads, width // heads).transpose(1, 2)
        probabilities = torch.softmax(query @ key.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
        columns.append(probabilities[..., positions].reshape(-1))
    assert len(inputs) == sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    return torch.cat(columns).norm()


def test_fmn_loss_matches_formula(tiny_model):
    prompt = "a photo of circle"
    positions = fmn.concept_token_positions(tiny_model, prompt, "circle", use_pooler=True, eot_positions="first")
    assert positions.tolist() == [4, 5]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    timesteps = torch.tensor([300])
    states = tiny_model.encode_prompts([prompt])

    with torch.no_grad():
        plain = tiny_model.unet(latents, timesteps, encoder_hidden_states=states).sample
        with fmn.CrossAttentionCapture(tiny_model.unet, positions) as capture:
            captured = tiny_model.unet(latents, timesteps, encoder_hidden_states=states).sample
    loss = fmn.attention_resteering_loss(capture.maps)

    assert torch.allclose(captured, plain, atol=1e-5), "capturing must not change the UNet's output"
    expected = attention_norm_by_hand(tiny_model.unet, latents, timesteps, states, positions)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=0)


def test_fmn_padding_positions(tiny_model):
    first = fmn.concept_token_positions(tiny_model, "a photo of circle", "circle", True, "first")
    every = fmn.concept_token_positions(tiny_model, "a photo of circle", "circle", True, "all")
    without = fmn.concept_token_positions(tiny_model, "a photo of circle", "circle", False, "all")
    assert first.tolist() == [4, 5]
    assert every.tolist() == [4] + list(range(5, MAX_LENGTH))
    assert without.tolist() == [4]

    inverted = fmn.InvertedPrompt(tiny_model, "a photo of {}", 4)
    assert inverted.positions(tiny_model, True, "first").tolist() == [4, 5, 6, 7, 8]
    assert inverted.positions(tiny_model, True, "all").tolist() == [4, 5, 6, 7] + list(range(8, MAX_LENGTH))


@pytest.mark.parametrize("only_cross_attention", [True, False])
def test_fmn_changes_only_parameters_with_gradient(tiny_model, circle, only_cross_attention):
    declared = expected_unet_set(tiny_model, "xattn" if only_cross_attention else "full")
    trainee = tiny_model.copy()
    make_trainable(trainee.unet, sorted(declared))
    states = tiny_model.encode_prompts(["a photo of circle"])
    positions = fmn.concept_token_positions(tiny_model, "a photo of circle", "circle", True, "first")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with fmn.CrossAttentionCapture(trainee.unet, positions) as capture:
        trainee.unet(latents, torch.tensor([400]), encoder_hidden_states=states)
    fmn.attention_resteering_loss(capture.maps).backward()
    with_gradient = names_with_gradient(trainee.unet)
    assert with_gradient <= declared
    # No attention probability depends on the last cross-attention's value and output projections
    # or on the layers after it.
    last = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert f"{last}.to_q.weight" in with_gradient
    assert not any(name.startswith((f"{last}.to_v.", f"{last}.to_out.")) for name in with_gradient)
    assert "conv_out.weight" not in with_gradient

    trainee, changed = run_defense("fmn", tiny_model, circle, steps=2, num_images=2, lr=1e-3,
                                   only_optimize_ca=only_cross_attention)
    changed_names = changed_parameter_names(trainee, tiny_model)
    assert {name.removeprefix("unet/") for name in changed_names} <= declared
    assert all(name.startswith("unet/") for name in changed_names)
    assert set(changed["unet"]) == {name.removeprefix("unet/") for name in changed_names}
    assert any(".attn2.to_k." in name for name in changed["unet"])


def test_fmn_textual_inversion_stage(tiny_model, circle, tmp_path):
    _, changed = run_defense("fmn", tiny_model, circle, tmp_path, steps=2, num_images=2, use_ti=True, ti_steps=3)
    assert changed["unet"]
    assert list(tmp_path.glob("fmn-inversion-*.safetensors"))
    assert (tmp_path / "loss-ti.png").is_file()
    assert (tmp_path / "loss.png").is_file()


# ----------------------------------------------------------------------------------------
# (e) Resuming


class Interrupt(Exception):
    pass


def interrupt_at(step_to_fail):
    def callback(step, loss):
        if step == step_to_fail:
            raise Interrupt(f"interrupted after step {step}")
    return callback


@pytest.mark.parametrize("name, settings", [
    ("esd-u", dict(iterations=6, ddim_steps=4, lr=1e-3)),
    ("advunlearn", dict(iterations=6, warmup_iterations=2, attack_steps=2, ddim_steps=4, retain_batch=2, lr=1e-3)),
    ("fmn", dict(steps=6, num_images=3, lr=1e-3)),
])
def test_resumed_training_equals_uninterrupted(tiny_model, circle, tmp_path, name, settings):
    _, uninterrupted = run_defense(name, tiny_model, circle, tmp_path / "straight", checkpoint_every=2, **settings)

    work_dir = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run_defense(name, tiny_model, circle, work_dir, callback=interrupt_at(4), checkpoint_every=2, **settings)
    assert list(work_dir.glob("*-checkpoint.safetensors")), "a checkpoint must be left after the interruption"

    resumed_steps = []
    _, resumed = run_defense(name, tiny_model, circle, work_dir, checkpoint_every=2,
                             callback=lambda step, loss: resumed_steps.append(step), **settings)
    assert resumed_steps == [4, 5], "training must resume after the last checkpoint (step 4)"
    assert not list(work_dir.glob("*-checkpoint.safetensors")), "the checkpoint is removed once training ends"
    assert (work_dir / "loss.png").is_file()

    for component, weights in uninterrupted.items():
        assert set(resumed[component]) == set(weights)
        for key, tensor in weights.items():
            assert torch.equal(resumed[component][key], tensor), f"{component}/{key} differs after resuming"


def test_checkpoint_with_other_settings_is_ignored(tiny_model, circle, tmp_path):
    settings = dict(iterations=4, ddim_steps=4, checkpoint_every=2)
    with pytest.raises(Interrupt):
        run_defense("esd-x", tiny_model, circle, tmp_path, callback=interrupt_at(2), **settings)
    steps = []
    run_defense("esd-x", tiny_model, circle, tmp_path, callback=lambda step, loss: steps.append(step),
                **{**settings, "lr": 2e-5})
    assert steps == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------
# Runner integration


def test_runner_erases_with_esd(tmp_path):
    from benchmark.runner import RunRequest, run

    sets = ["run.max_prompts=2", "run.utility=false", "defense.iterations=2", "defense.ddim_steps=4"]
    folder = run(RunRequest(defense="esd-x", attack="none", model="tiny-random", output=tmp_path, sets=sets,
                            show_progress=False))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["erased_sha256"]["unet"] != manifest["model"]["base_sha256"]["unet"]
    assert manifest["model"]["erased_sha256"]["text_encoder"] == manifest["model"]["base_sha256"]["text_encoder"]
    assert (Path(manifest["model"]["erased_weights_cache"]) / "loss.png").is_file()


# ----------------------------------------------------------------------------------------
# (d) Published checkpoints


def save_safetensors(state, path):
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def test_text_encoder_checkpoint_loads(tiny_model, tmp_path):
    state = tiny_model.text_encoder.state_dict()
    path = save_safetensors(state, tmp_path / "text_encoder.safetensors")
    component, loaded = load_component_weights(path, tiny_model)
    assert component == "text_encoder"
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_advunlearn_wrapper_format_loads(tiny_model, tmp_path):
    state = tiny_model.text_encoder.state_dict()
    wrapper = {f"text_encoder.text_model.{key}": value + 1 for key, value in state.items()}
    wrapper.update({f"encoder.{key.removeprefix('encoder.')}": value for key, value in state.items()
                    if key.startswith("encoder.")})
    wrapper.update({f"embedding.{key.removeprefix('embeddings.')}": value for key, value in state.items()
                    if key.startswith("embeddings.")})
    wrapper["final_layer_norm.weight"] = state["final_layer_norm.weight"]
    wrapper["final_layer_norm.bias"] = state["final_layer_norm.bias"]
    path = tmp_path / "TextEncoder-text_encoder_full-epoch_999.pt"
    torch.save(wrapper, path)

    component, loaded = load_component_weights(path, tiny_model)
    assert component == "text_encoder"
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], state[key] + 1) for key in state)


def test_text_model_prefix_and_folder_load(tiny_model, tmp_path):
    state = tiny_model.text_encoder.state_dict()
    prefixed = save_safetensors({f"text_model.{key}": value for key, value in state.items()}, tmp_path / "te.safetensors")
    assert load_component_weights(prefixed, tiny_model, "text_encoder")[0] == "text_encoder"

    tiny_model.text_encoder.save_pretrained(tmp_path / "nudity_unlearned")
    component, loaded = load_component_weights(tmp_path / "nudity_unlearned", tiny_model)
    assert component == "text_encoder"
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_esd_unet_state_dict_loads(tiny_model, tmp_path):
    state = tiny_model.unet.state_dict()
    path = tmp_path / "diffusers-VanGogh-ESDx1-UNET.pt"
    torch.save(state, path)
    component, loaded = load_component_weights(path, tiny_model)
    assert component == "unet"
    assert set(loaded) == set(state)


def test_unet_file_as_text_encoder_names_unet(tiny_model, tmp_path):
    path = tmp_path / "esd.pt"
    torch.save(tiny_model.unet.state_dict(), path)
    with pytest.raises(CheckpointError, match="look like a unet checkpoint; pass component=unet"):
        load_component_weights(path, tiny_model, "text_encoder")


def test_text_encoder_file_as_unet_names_text_encoder(tiny_model, tmp_path):
    path = save_safetensors(tiny_model.text_encoder.state_dict(), tmp_path / "te.safetensors")
    with pytest.raises(CheckpointError, match="look like a text_encoder checkpoint; pass component=text_encoder"):
        load_component_weights(path, tiny_model, "unet")


def test_partial_and_original_layout_files_rejected(tiny_model, tmp_path):
    state = tiny_model.unet.state_dict()
    partial = {key: value for key, value in state.items() if "attn2" in key}
    with pytest.raises(CheckpointError, match="missing"):
        load_component_weights(save_safetensors(partial, tmp_path / "partial.safetensors"), tiny_model, "unet")

    original_layout = {f"model.diffusion_model.{index}": value for index, value in enumerate(state.values())}
    path = save_safetensors(original_layout, tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match="original single-file layout"):
        load_component_weights(path, tiny_model, "unet")
    with pytest.raises(CheckpointError, match="original-layout unet"):
        load_component_weights(path, tiny_model)


def test_wrong_shapes_rejected(tiny_model, tmp_path):
    state = dict(tiny_model.unet.state_dict())
    state["conv_in.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(CheckpointError, match="other shapes.*conv_in.weight"):
        load_component_weights(save_safetensors(state, tmp_path / "unet.safetensors"), tiny_model, "unet")


def test_html_and_truncated_files_rejected(tiny_model, tmp_path):
    html = tmp_path / "model.safetensors"
    html.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>" * 4)
    with pytest.raises(CheckpointError, match="HTML"):
        load_component_weights(html, tiny_model)

    complete = save_safetensors(tiny_model.text_encoder.state_dict(), tmp_path / "complete.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(complete.read_bytes()[: complete.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_component_weights(truncated, tiny_model)

    torch_file = tmp_path / "unet.pt"
    torch.save(tiny_model.unet.state_dict(), torch_file)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(torch_file.read_bytes()[: torch_file.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_component_weights(cut, tiny_model)

    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(CheckpointError, match="no weight file"):
        load_component_weights(empty_folder, tiny_model)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_never_runs(tiny_model, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "TextEncoder-malicious.pt"
    state = {f"text_encoder.text_model.{key}": value for key, value in tiny_model.text_encoder.state_dict().items()}
    state["payload"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, path)

    with pytest.raises(CheckpointError):
        load_component_weights(path, tiny_model)
    assert not marker.exists()


def test_checkpoint_defense_returns_changed_weights(tiny_model, circle, tmp_path):
    state = {key: value.clone() for key, value in tiny_model.text_encoder.state_dict().items()}
    state["final_layer_norm.weight"] += 1
    path = save_safetensors(state, tmp_path / "erased.safetensors")

    defense = PublishedCheckpoint(PublishedCheckpoint.Config(path=str(path)))
    assert len(defense.describe()["weights_sha256"]) == 64
    changed = defense.erase(tiny_model.copy(), erasure_context(tiny_model, circle))
    assert list(changed) == ["text_encoder"]
    assert list(changed["text_encoder"]) == ["final_layer_norm.weight"]


def test_checkpoint_defense_requires_path():
    from benchmark.config import ConfigError

    with pytest.raises(ConfigError, match="defense.path"):
        PublishedCheckpoint().describe()


# ----------------------------------------------------------------------------------------
# (b) Erasure on the default world

WORLD_MISSING = not (WORLD_WEIGHTS_DIR / "model_index.json").exists()
NEEDS_WORLD = pytest.mark.skipif(WORLD_MISSING, reason=f"the default world's weights are not in {WORLD_WEIGHTS_DIR}; "
                                                       "build them with `python -m benchmark.world.train`")


def test_world_budgets_reach_runner():
    from benchmark.runner import model_budgets

    budgets = model_budgets("world")
    for name in ("esd-x", "esd-u", "esd-full", "fmn", "advunlearn"):
        assert f"defense/{name}" in budgets, (
            f"the runner does not apply defense/{name} from {BUDGETS_FILE}: the registered 'world' loader "
            "needs a budgets() attribute, e.g. load_world.budgets = world_budgets")


def world_rates(defense, output):
    """Return (circle rate under plain prompts, other shapes' retain accuracy) with the world's budgets."""
    from benchmark.runner import RunRequest, run

    # The budgets file is also passed explicitly, so these checks work even while the loader does
    # not declare it (see test_world_budgets_reach_runner). The values are the same.
    folder = run(RunRequest(defense=defense, attack="none", concept="circle", output=output,
                            config_file=str(BUDGETS_FILE), sets=["run.threads=1"], show_progress=False))
    summary = json.loads((folder / "summary.json").read_text())
    return summary["pre_attack_asr"], summary["utility"]["retain_accuracy"]["accuracy"]


@pytest.fixture(scope="module")
def world_base_rates(tmp_path_factory):
    return world_rates("none", tmp_path_factory.mktemp("world-base"))


@NEEDS_WORLD
@pytest.mark.slow
@pytest.mark.parametrize("defense", ["esd-u", "advunlearn"])
# TODO: esd-u fails on an AVX2 AMD EPYC (circle rate 0.26); the world budget was sized on another CPU.
def test_world_circle_is_erased(defense, world_base_rates, tmp_path):
    base_circle, base_retain = world_base_rates
    circle_rate, retain = world_rates(defense, tmp_path)
    retained_share = retain / base_retain
    report = (f"{defense}: circle rate {base_circle:.2f} -> {circle_rate:.2f}, "
              f"other shapes {base_retain:.2f} -> {retain:.2f} ({retained_share:.0%} of the base rate)")
    assert circle_rate <= 0.20, report
    assert retained_share >= 0.70, report


ROBUSTNESS_PROMPTS = 20


def unlearndiffatk_summary(defense, output, settings=None):
    """Run UnlearnDiffAtk against ``defense`` (world budgets, then ``settings``) on the first prompts."""
    from benchmark.runner import RunRequest, run

    sets = ["run.threads=1", "run.utility=false", f"run.max_prompts={ROBUSTNESS_PROMPTS}"]
    sets += [f"defense/{defense}.{key}={value}" for key, value in (settings or {}).items()]
    folder = run(RunRequest(defense=defense, attack="unlearndiffatk", concept="circle", output=output,
                            config_file=str(BUDGETS_FILE), sets=sets, show_progress=False))
    return json.loads((folder / "summary.json").read_text())


@NEEDS_WORLD
@pytest.mark.slow
# TODO: fails on an AVX2 AMD EPYC by one prompt (ESD-x 0.60, AdvUnlearn 0.35 against a limit of 0.30).
def test_advunlearn_resists_unlearndiffatk_better_than_esd(tmp_path):
    from benchmark.selftest import vulnerable_defense

    # The ESD that UnlearnDiffAtk breaks on the world. At the world's own ESD budgets the attack gains nothing.
    esd, esd_settings = vulnerable_defense("world", "unlearndiffatk")
    esd_summary = unlearndiffatk_summary(esd, tmp_path / "esd", esd_settings)
    robust_summary = unlearndiffatk_summary("advunlearn", tmp_path / "advunlearn")
    report = (f"{esd}: pre-attack ASR {esd_summary['pre_attack_asr']:.2f}, ASR {esd_summary['asr']:.2f}; "
              f"advunlearn: pre-attack ASR {robust_summary['pre_attack_asr']:.2f}, ASR {robust_summary['asr']:.2f}")

    assert esd_summary["asr"] >= esd_summary["pre_attack_asr"] + 0.2, f"the attack did not land on ESD: {report}"
    assert robust_summary["asr"] <= esd_summary["asr"] / 2, report


# ----------------------------------------------------------------------------------------
# (c) One step on the full-size SD v1.4 architecture


@pytest.fixture(scope="module")
def sd14_random():
    from benchmark.models.loading import build_sd14_random

    return build_sd14_random(seed=0)


# Parameter subsets keep memory low: training the whole UNet keeps its 3.4 GB five times over
# (weights, frozen copy, gradients, two Adam moments). Images are 256 px to save time.
@pytest.mark.slow
@pytest.mark.parametrize("name, settings", [
    ("esd-x", dict(iterations=1, ddim_steps=2, resolution=256)),
    ("advunlearn", dict(iterations=1, warmup_iterations=0, attack_steps=1, ddim_steps=2, retain_batch=2,
                        resolution=256)),
    ("fmn", dict(steps=1, num_images=1, image_steps=2, only_optimize_ca=True, resolution=256)),
])
def test_sd14_architecture_one_step(sd14_random, circle, name, settings):
    trainee, changed = run_defense(name, sd14_random, circle, **settings)
    component = "text_encoder" if name == "advunlearn" else "unet"
    assert changed[component]
    for key, tensor in changed[component].items():
        assert torch.isfinite(tensor).all(), key
