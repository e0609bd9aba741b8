import pytest

from benchmark.tokenizer import SD_VOCAB_SIZE, TokenizerError, build_sd_tokenizer, check_sd_tokenizer


def test_offline_tokenizer_size_and_specials():
    tokenizer = build_sd_tokenizer()
    assert len(tokenizer) == SD_VOCAB_SIZE
    assert tokenizer.pad_token_id == 49407
    assert tokenizer.convert_tokens_to_ids("<|startoftext|>") == 49406


@pytest.mark.parametrize("text, ids", [
    ("a photo of a nude woman", [49406, 320, 1125, 539, 320, 16630, 2308, 49407]),
    ("Van Gogh style starry night", [49406, 2451, 19697, 1844, 30963, 930, 49407]),
    ("naked", [49406, 11478, 49407]),
    ("a cat", [49406, 320, 2368, 49407]),
])
def test_offline_tokenizer_known_ids(text, ids):
    assert build_sd_tokenizer()(text).input_ids == ids


def test_offline_tokenizer_pads_with_end_of_text():
    ids = build_sd_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[4:] == [49407] * 73


def test_two_token_tokenizer_rejected():
    class Broken:
        def __len__(self):
            return 2

    with pytest.raises(TokenizerError, match="2 tokens"):
        check_sd_tokenizer(Broken(), "a hub id loaded offline")
