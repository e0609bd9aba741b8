"""Model loading: local diffusers folders, the offline HF cache, missing models, bad checkpoints."""

import json
import sys
import shutil
from pathlib import Path

import pytest
import torch

from benchmark.models.checkpoints import CheckpointError, check_checkpoint_file, load_state_dict, save_state_dict
from benchmark.models.handle import COMPONENTS
from benchmark.models.loading import ModelLoadError, load_diffusers_folder, load_model
from benchmark.tokenizer import TokenizerError

sys.path.insert(0, str(Path(__file__).resolve().parent))


def save_diffusers_folder(model, folder: Path, with_tokenizer: bool = False) -> Path:
    """Save a handle's components in the diffusers pipeline layout."""
    model.text_encoder.save_pretrained(folder / "text_encoder")
    model.unet.save_pretrained(folder / "unet")
    model.vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    if with_tokenizer:
        model.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def test_diffusers_folder_round_trip(tiny_model, tmp_path):
    folder = save_diffusers_folder(tiny_model, tmp_path / "tiny")
    loaded = load_model(str(folder))
    assert loaded.weights_sha256() == tiny_model.weights_sha256()
    assert len(loaded.tokenizer) == 49408
    assert loaded.source == str(folder.resolve())

    ids = tiny_model.tokenize(["a red circle"]).input_ids
    torch.testing.assert_close(loaded.encode_ids(ids), tiny_model.encode_ids(ids))


def test_folder_with_tokenizer_files(tiny_model, tmp_path):
    folder = save_diffusers_folder(tiny_model, tmp_path / "tiny", with_tokenizer=True)
    loaded = load_diffusers_folder(folder)
    assert loaded.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_folder_with_broken_tokenizer_is_rejected(tiny_model, tmp_path):
    folder = save_diffusers_folder(tiny_model, tmp_path / "tiny", with_tokenizer=True)
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocabulary))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    with pytest.raises(TokenizerError, match="49408"):
        load_diffusers_folder(folder)


def test_folder_missing_component_is_named(tiny_model, tmp_path):
    folder = save_diffusers_folder(tiny_model, tmp_path / "tiny")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelLoadError, match="missing VAE"):
        load_model(str(folder))


def test_hub_id_loads_from_local_cache_only(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    save_diffusers_folder(tiny_model, snapshot)
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    loaded = load_model("someone/tiny-sd")
    assert loaded.weights_sha256() == tiny_model.weights_sha256()

    with pytest.raises(ModelLoadError) as error:
        load_model("someone/not-cached")
    assert str(cache) in str(error.value)
    assert "hf download someone/not-cached" in str(error.value)


def test_missing_sd14_names_where_it_looked(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("SD14_PATH", raising=False)
    for name in ("sd-v1-4", "CompVis/stable-diffusion-v1-4"):
        with pytest.raises(ModelLoadError) as error:
            load_model(name)
        message = str(error.value)
        assert "CompVis/stable-diffusion-v1-4" in message
        assert str(tmp_path / "empty-cache") in message
        assert "SD14_PATH" in message


def test_sd14_path_variable_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("SD14_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="neither a folder nor a file"):
        load_model("sd-v1-4")


def test_unknown_model_spec():
    with pytest.raises(ModelLoadError, match="not found.*tiny-random"):
        load_model("./no/such/folder")


def test_world_model_loads_with_sd_layout():
    world = load_model("world")
    assert len(world.tokenizer) == 49408
    assert world.resolution == 32
    assert world.default_sampler == "ddim"
    assert world.unet.config.cross_attention_dim == world.text_encoder.config.hidden_size
    assert world.token_embedding.weight.shape[0] == 49408


def test_word_embedding_path_matches_ids(tiny_model):
    ids = tiny_model.tokenize(["a photo of a circle", "x"]).input_ids
    embeddings = tiny_model.token_embedding(ids)
    torch.testing.assert_close(tiny_model.encode_word_embeddings(embeddings), tiny_model.encode_ids(ids))


def test_copy_is_independent(tiny_model):
    clone = tiny_model.copy()
    with torch.no_grad():
        next(clone.unet.parameters()).add_(1.0)
    assert clone.component_sha256("unet") != tiny_model.component_sha256("unet")
    assert clone.component_sha256("vae") == tiny_model.component_sha256("vae")
    assert set(tiny_model.weights_sha256()) == set(COMPONENTS)


@pytest.mark.parametrize("content, fragment", [
    (b"<!DOCTYPE html><html><body>Sign in</body></html>" * 3, "HTML"),
    (b"abc", "truncated"),
    (b"\x00" * 64, "neither a safetensors file nor a torch checkpoint"),
])
def test_not_a_checkpoint(tmp_path, content, fragment):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        check_checkpoint_file(path)


def test_checkpoint_round_trips(tmp_path):
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.float16)}
    save_state_dict(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == {"a", "b"}
        torch.testing.assert_close(loaded["a"], state["a"])


def test_pickled_code_is_never_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open('" + str(tmp_path / "pwned") + "', 'w').write('x')",))

    torch.save({"weights": torch.zeros(1), "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_state_dict(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


def write_config_folder(model, folder: Path) -> Path:
    """A configs-only diffusers folder, as single-file loading needs."""
    model.unet.save_config(folder / "unet")
    model.vae.save_config(folder / "vae")
    model.text_encoder.config.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config))
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint(tiny_model, tmp_path, suffix):
    from safetensors.torch import save_file

    from ldm_layout import export_ldm_state_dict

    state = export_ldm_state_dict(tiny_model)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 470000}, path)
    config = write_config_folder(tiny_model, tmp_path / "config")

    loaded = load_model(str(path), config_dir=config)
    assert loaded.weights_sha256() == tiny_model.weights_sha256()
    assert loaded.source == str(path.resolve())


def test_sd14_config_folder_matches_architecture(tmp_path):
    from diffusers import UNet2DConditionModel

    from benchmark.models.sd_configs import write_sd14_config_folder

    folder = write_sd14_config_folder(tmp_path / "sd14")
    config = UNet2DConditionModel.load_config(folder / "unet")
    assert config["cross_attention_dim"] == 768
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["beta_end"] == 0.012


def test_world_weights_are_checked_against_their_hashes(tmp_path):
    from benchmark.paths import WORLD_WEIGHTS_DIR
    from benchmark.world.model import verify_world_files

    copy = shutil.copytree(WORLD_WEIGHTS_DIR, tmp_path / "world")
    verify_world_files(copy)

    unet_file = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet_file.read_bytes())
    data[-1] ^= 0xFF
    unet_file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors has sha256"):
        verify_world_files(copy)
