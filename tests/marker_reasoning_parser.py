"""A reasoning parser for tests, loaded with `--reasoning-parser-plugin` (vLLM's plugin path):
reasoning opens with `<|channel>` and ends at the token a request names in its chat template
arguments (`chat_template_kwargs: {"reasoning_end": TOKEN}`), `<channel|>` by default.

A random tiny model never writes Gemma 4's `<channel|>`, so a test picks as the end one of the
tokens the model does write, and sees the grammar start after it (reasoning_bounds.py). It is a
plain token parser (vLLM's `BaseThinkingReasoningParser`), so it also covers the path vLLM
takes for parsers other than its engine-based ones (Gemma 4's).
"""

from vllm.reasoning import ReasoningParserManager
from vllm.reasoning.basic_parsers import BaseThinkingReasoningParser


@ReasoningParserManager.register_module("marker")
class MarkerReasoningParser(BaseThinkingReasoningParser):
    def __init__(self, tokenizer, *args, **kwargs):
        self._end = (kwargs.get("chat_template_kwargs") or {}).get("reasoning_end", "<channel|>")
        super().__init__(tokenizer, *args, **kwargs)

    @property
    def start_token(self) -> str:
        return "<|channel>"

    @property
    def end_token(self) -> str:
        return self._end
