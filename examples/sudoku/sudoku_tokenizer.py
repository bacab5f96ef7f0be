"""Character-level tokenizers for Sudoku boards, laid out like Gemma's (built offline).

Ids 0..106 are Gemma's special tokens at their real ids (pad 0, eos 1, bos 2, ...;
`diffusiongemma_vllm.testing.tiny_tokenizer.special_tokens`), so the checkpoint's EOS list
[1, 106, 50] means what it means in the release. Two layouts of the board text (81
characters, '1'-'9' and '.', then a newline):

- `cells` (the shipped one): cell i of the board is one token that names both the cell and
  its content, "cell i holds 5" or "cell i is blank". The tokenizer's normalizer marks the
  i-th character of the first line with a private-use character U+E000+i, the
  pre-tokenizer keeps marker and character together, and the decoder drops the markers, so
  the text a user sends and reads is still the plain 81 characters. The model therefore
  reads each cell's row, column and box from its token (the embedding of "cell i holds d"
  is free to encode all three), where RoPE alone only gives a flat line of 81 positions.
  '0' is read as a blank, as in the Kaggle and Gemma-recipe data.
- `flat`: one token per character, the same token for a digit wherever it stands (the
  format of the first checkpoint; kept to measure the format lever).
"""

from __future__ import annotations

from pathlib import Path

from diffusiongemma_vllm.testing.tiny_tokenizer import CHAT_TEMPLATE, special_tokens

CELLS = 81
CELL_CHARACTERS = "123456789."
# Standalone characters: a board's past its 81st cell, and those of the reply to a request
# that is not a valid puzzle (puzzles.INVALID_REPLY).
CHARACTERS = list(CELL_CHARACTERS + "\n abcdefghijklmnopqrstuvwxyz:,-")
MARKER_BASE = 0xE000
LAYOUTS = ("cells", "flat")
VOCAB_SIZES = {"cells": 960, "flat": 160}  # specials + board tokens, rounded up


def cell_token(cell: int, character: str) -> str:
    """The vocabulary entry for `character` standing in `cell` (layout `cells`)."""
    return chr(MARKER_BASE + cell) + character


def board_vocabulary(layout: str) -> list[str]:
    """The non-special entries, in id order after Gemma's specials."""
    if layout == "flat":
        return CHARACTERS
    return [cell_token(i, ch) for i in range(CELLS) for ch in CELL_CHARACTERS] + CHARACTERS


def standalone_ids(text: str, layout: str = "cells") -> list[int]:
    """Ids of `text` as standalone characters (never cell tokens): how a message is written."""
    first = len(special_tokens()) + len(board_vocabulary(layout)) - len(CHARACTERS)
    return [first + CHARACTERS.index(ch) for ch in text]


def build_sudoku_tokenizer(layout: str = "cells"):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    vocab = {token: i for i, token in enumerate(special_tokens())}
    for entry in board_vocabulary(layout):
        vocab[entry] = len(vocab)
    filler = [f"<unused{i}>" for i in range(len(vocab), VOCAB_SIZES[layout])]
    vocab.update({token: len(vocab) + k for k, token in enumerate(filler)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if layout == "flat":
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
    else:
        # Mark from the last cell down, so each lookbehind still counts unmarked characters.
        marks = [normalizers.Replace(Regex(f"(?<=\\A[^\\n]{{{i}}})"), chr(MARKER_BASE + i))
                 for i in reversed(range(CELLS))]
        tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("0", "."), *marks])
        markers = f"[{chr(MARKER_BASE)}-{chr(MARKER_BASE + CELLS - 1)}]"
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(f"{markers}?[\\s\\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Sequence([decoders.Replace(Regex(markers), ""), decoders.Fuse()])
    tokenizer.add_special_tokens(special_tokens() + filler)  # never text, even if sampled
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def save_sudoku_tokenizer(out_dir: str | Path, layout: str = "cells") -> None:
    build_sudoku_tokenizer(layout).save_pretrained(str(out_dir))
