"""A character-level tokenizer for Sudoku boards, laid out like Gemma's (built offline).

Every board character ('1'-'9', '.', newline) is exactly one token, so a cell is a canvas
position. Ids 0..106 are Gemma's special tokens at their real ids (pad 0, eos 1, bos 2, ...;
`diffusiongemma_vllm.testing.tiny_tokenizer.special_tokens`), so the checkpoint's EOS list
[1, 106, 50] means what it means in the release; the characters follow.
"""

from __future__ import annotations

from pathlib import Path

from diffusiongemma_vllm.testing.tiny_tokenizer import CHAT_TEMPLATE, special_tokens

CHARACTERS = list("123456789.\n ")
VOCAB_SIZE = 128  # 107 specials + characters, rounded up


def build_sudoku_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(special_tokens())}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(special_tokens())
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def save_sudoku_tokenizer(out_dir: str | Path) -> None:
    build_sudoku_tokenizer().save_pretrained(str(out_dir))
