"""The Stable Diffusion v1 CLIP tokenizer, built offline from the BPE file that open_clip ships.

SD v1.x uses OpenAI's CLIP BPE vocabulary: 256 byte tokens, their 256 end-of-word variants,
48,894 merges and the two special tokens, 49,408 ids in all, padded with the end-of-text id.
open_clip ships the same merge list as ``bpe_simple_vocab_16e6.txt.gz``, so the vocabulary can be
rebuilt without network access and matches the ``tokenizer/`` folder of SD v1.4 id for id.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

SD_VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
MAX_LENGTH = 77

_N_MERGES = 49152 - 256 - 2


class TokenizerError(RuntimeError):
    """A tokenizer could not be built or loaded, or is not the SD v1 tokenizer."""


def _bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character, as GPT-2 style BPE does."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))

    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _open_clip_bpe_path() -> Path:
    try:
        import open_clip
    except ImportError as error:
        raise TokenizerError(
            "building the SD v1 tokenizer offline needs the open_clip_torch package "
            "(pip install open_clip_torch), or pass a folder that contains tokenizer files"
        ) from error

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise TokenizerError(f"open_clip's BPE vocabulary file is missing: {path}")
    return path


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    """Return the SD v1 vocabulary (token -> id) and its merge rules, built from open_clip's BPE file."""
    with gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = tuple(lines[1 : _N_MERGES + 1])

    tokens = list(_bytes_to_unicode().values())
    tokens += [token + "</w>" for token in tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]

    vocabulary = {token: index for index, token in enumerate(tokens)}
    if len(vocabulary) != SD_VOCAB_SIZE:
        raise TokenizerError(f"built a vocabulary of {len(vocabulary)} tokens; expected {SD_VOCAB_SIZE}")
    return vocabulary, merges


def check_sd_tokenizer(tokenizer, source: str) -> None:
    """Raise unless ``tokenizer`` has the SD v1 vocabulary.

    transformers 5 can return a 2-token tokenizer, without an error, when a hub id is loaded
    offline, and every prompt then encodes to the same ids. This check turns that into an error.
    """
    size = len(tokenizer)
    if size != SD_VOCAB_SIZE:
        raise TokenizerError(
            f"the tokenizer loaded from {source} has {size} tokens; SD v1 needs {SD_VOCAB_SIZE}. "
            "Point the model at a folder with a complete tokenizer/ subfolder, or remove the "
            "folder so the suite builds the tokenizer from open_clip's vocabulary"
        )
    ids = tokenizer("a photo").input_ids
    if ids[:3] != [BOS_TOKEN_ID, 320, 1125]:
        raise TokenizerError(f"the tokenizer loaded from {source} encodes 'a photo' as {ids}, not as SD v1 does")


@lru_cache(maxsize=1)
def build_sd_tokenizer():
    """Build SD v1.4's ``CLIPTokenizer`` from open_clip's BPE file, without any download."""
    from transformers import CLIPTokenizer

    vocabulary, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(
        vocab=dict(vocabulary),
        merges=[tuple(merge.split()) for merge in merges],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_LENGTH,
    )
    check_sd_tokenizer(tokenizer, "open_clip's BPE vocabulary")
    return tokenizer


def save_vocabulary_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in the layout of SD v1.4's ``tokenizer/`` folder."""
    vocabulary, merges = clip_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as handle:
        json.dump(vocabulary, handle, ensure_ascii=False, sort_keys=True)
    with open(folder / "merges.txt", "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")
