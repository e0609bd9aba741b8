"""Export a diffusers-layout model to the original (CompVis LDM) single-file key layout.

Tests use it to build small ``.safetensors``/``.ckpt`` files in the layout of ``sd-v1-4.ckpt``,
so that single-file loading is exercised without the real 4 GB checkpoint. The prefix rules
follow the LDM UNet and VAE module trees and generalise over ``layers_per_block``.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))


def _unet_prefixes(config) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for a UNet2DConditionModel config."""
    per_block = config.layers_per_block
    blocks = len(config.block_out_channels)
    pairs = list(_UNET_FIXED.items())

    for i, block_type in enumerate(config.down_block_types):
        for j in range(per_block):
            ldm = (per_block + 1) * i + j + 1
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{ldm}.0."))
            if "CrossAttn" in block_type:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{ldm}.1."))
        if i < blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per_block + 1) * (i + 1)}.0.op."))

    for i, block_type in enumerate(config.up_block_types):
        has_attention = "CrossAttn" in block_type
        for j in range(per_block + 1):
            ldm = (per_block + 1) * i + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{ldm}.0."))
            if has_attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{ldm}.1."))
        if i < blocks - 1:
            position = 2 if has_attention else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per_block + 1) * i + per_block}.{position}."))

    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs.extend((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2))
    return pairs


def _vae_prefixes(config) -> list[tuple[str, str]]:
    blocks = len(config.block_out_channels)
    per_block = config.layers_per_block
    pairs = [("mid_block.attentions.0.", "mid.attn_1."), ("conv_norm_out.", "norm_out.")]
    pairs += [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]
    for i in range(blocks):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(per_block)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{blocks - 1 - i}.block.{j}.")
                  for j in range(per_block + 1)]
        if i < blocks - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample."))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for source, target in sorted(pairs, key=lambda pair: -len(pair[0])):
        if key.startswith(source):
            return target + key[len(source):]
        inner = "." + source
        if inner in key:
            return key.replace(inner, "." + target, 1)
    return key


def export_unet(unet) -> dict[str, torch.Tensor]:
    pairs = _unet_prefixes(unet.config)
    state = {}
    for key, tensor in unet.state_dict().items():
        renamed = _rename(key, pairs)
        for source, target in _RESNET:
            if ".resnets." in key:
                renamed = renamed.replace("." + source, "." + target)
        state[UNET_PREFIX + renamed] = tensor
    return state


def export_vae(vae) -> dict[str, torch.Tensor]:
    pairs = _vae_prefixes(vae.config)
    attention = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
    state = {}
    for key, tensor in vae.state_dict().items():
        renamed = key
        for source, target in sorted(pairs, key=lambda pair: -len(pair[0])):
            if source in renamed:
                renamed = renamed.replace(source, target, 1)
                break
        renamed = renamed.replace("conv_shortcut.", "nin_shortcut.")
        if "mid.attn_1." in renamed:
            for source, target in attention:
                renamed = renamed.replace("mid.attn_1." + source, "mid.attn_1." + target)
            if tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
        state[VAE_PREFIX + renamed] = tensor
    return state


def export_text_encoder(text_encoder) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in text_encoder.state_dict().items():
        key = key[len("text_model."):] if key.startswith("text_model.") else key
        state[TEXT_PREFIX + key] = tensor
    return state


def export_ldm_state_dict(model) -> dict[str, torch.Tensor]:
    """Return the single-file state dict of a ``ModelHandle``'s UNet, VAE and text encoder."""
    state = {}
    state.update(export_unet(model.unet))
    state.update(export_vae(model.vae))
    state.update(export_text_encoder(model.text_encoder))
    return {key: value.contiguous() for key, value in state.items()}
