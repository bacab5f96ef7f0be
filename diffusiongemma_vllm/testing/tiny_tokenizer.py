"""A small byte-level BPE tokenizer laid out like Gemma 4's, built offline.

Tiny checkpoints need a tokenizer that vLLM and transformers load like the real one:
`tokenizer.json` + `tokenizer_config.json` with a chat template, and the special tokens at
the ids the real vocabulary uses (pad 0, eos 1, bos 2, unk 3, the tool-call markers 46-52,
`<|turn>` 105, `<turn|>` 106, ...; the image tokens at tiny ids), because the checkpoint's `eos_token_id` list
([1, 106, 50]) names those ids, and vLLM's Gemma 4 tool-call and reasoning parsers look their
markers up by name. Unused ids below 107 are filler specials, as in Gemma.
The BPE merges are trained on a fixed built-in corpus, so a given vocabulary size always
yields the same tokenizer.
"""

from __future__ import annotations

import random
from pathlib import Path

# Gemma 4 special tokens at their real ids; every other id below FIRST_REGULAR_ID is filler.
GEMMA_SPECIAL_IDS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',  # Gemma 4's string delimiter inside tool calls
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
# Gemma 4's image tokens (begin, soft token, end) at tiny ids: the release has them at 255999,
# 258880 and 258882, beyond a tiny vocabulary (tiny_checkpoint.TinySpec.image_token_ids).
IMAGE_SPECIAL_IDS = {60: "<|image>", 61: "<|image|>", 62: "<image|>"}
FIRST_REGULAR_ID = 107
BYTE_ALPHABET = 256

# Gemma 4's turn structure; without thinking, the model turn opens with an empty thought channel.
# Tools are declared in the system turn, a model's tool calls and the tools' replies written
# with Gemma 4's markers (arguments as JSON, where Gemma writes its own key:value form).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set thinking = enable_thinking is defined and enable_thinking %}"
    "{%- if thinking or tools %}<|turn>system\n"
    "{% if thinking %}<|think|>{% endif %}"
    "{% for tool in tools or [] %}<|tool>declaration:{{ tool.function.name }}"
    "{{ tool.function.parameters | tojson }}<tool|>{% endfor %}"
    "<turn|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}<|tool_response>response:{{ message.get('name') or 'tool' }}"
    "{{ message['content'] }}<tool_response|>\n"
    "{%- else %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ (message['content'] or '') | trim }}"
    "{%- for call in message.get('tool_calls') or [] %}<|tool_call>call:{{ call.function.name }}"
    "{{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson }}"
    "<tool_call|>{%- endfor %}<turn|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|turn>model\n"
    "{%- if not thinking %}<|channel>thought\n<channel|>{%- endif %}"
    "{%- endif %}"
)

_WORDS = (
    "the a an of to in and is was for on with as by at from that this it be are were "
    "model diffusion canvas token block prefix cache attention expert router layer norm "
    "write read serve request answer question essay story poem list code python function "
    "red green blue small large fast slow quiet bright river mountain city ocean forest "
    "one two three four five six seven eight nine ten hundred thousand "
    "Portugal Lisbon Porto Europe history language music science garden kitchen window"
).split()


# Replies that are one word: with these in the corpus, "yes" and "no" become single tokens at
# the start of a reply, which vLLM's structured decisions API needs of its labels.
ANSWER_LINES = ["yes\n", "no\n"] * 400


def _corpus(num_lines: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        digits = "".join(rng.choice("0123456789.") for _ in range(rng.randint(0, 12)))
        lines.append(" ".join(words).capitalize() + ". " + digits + "\n")
    return lines


def special_tokens() -> list[str]:
    """All special tokens in id order: the real ones at their ids, filler elsewhere."""
    named = GEMMA_SPECIAL_IDS | IMAGE_SPECIAL_IDS
    return [named.get(i, f"<unused{i}>") for i in range(FIRST_REGULAR_ID)]


def build_tokenizer(vocab_size: int, answers: bool = False):
    """Train the byte-level BPE and wrap it as a transformers fast tokenizer; `answers` adds
    one-word replies to the corpus (ANSWER_LINES)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < FIRST_REGULAR_ID + BYTE_ALPHABET:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the tokenizer needs {FIRST_REGULAR_ID} "
            f"special ids plus {BYTE_ALPHABET} byte tokens"
        )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus() + ANSWER_LINES * answers, trainer=trainer)
    bos_id = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    for token_id, token in (GEMMA_SPECIAL_IDS | IMAGE_SPECIAL_IDS).items():
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(out_dir: str | Path, vocab_size: int, answers: bool = False) -> None:
    tokenizer = build_tokenizer(vocab_size, answers)
    tokenizer.save_pretrained(str(out_dir))
