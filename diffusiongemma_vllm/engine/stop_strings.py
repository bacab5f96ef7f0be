"""Stop strings, found in the engine core as each canvas arrives.

vLLM checks a request's stop strings (`SamplingParams.stop`) in the API server's detokenizer,
which then aborts the request in the engine core. For an autoregressive model the engine core
has run one more token by then; here, a request whose stop string lies inside a canvas would
already be denoising its next canvas (up to `max_denoising_steps` passes, which its batch mates
wait for), and the whole canvas would count as generated tokens in vLLM's metrics. So the
plugin's scheduler looks for stop strings in each canvas it receives and ends the request at
the token that completes the first one (past `min_tokens`, as vLLM's detokenizer counts them),
as vLLM's scheduler ends a request at a stop token:
the tokens after it are dropped before vLLM builds the step's output, and nothing more is
scheduled for the request.

The text is the request's output as vLLM's incremental detokenizer has it after each token:
decoded with the request's `skip_special_tokens`, without the trailing tokens whose bytes do
not yet end a character (the detokenizer holds those back, and emits nothing for them if the
request ends there). The stop string chosen is vLLM's (`check_stop_strings`: the one that
completes earliest, searching the new text and the end of the old). The API server still
detokenizes and truncates the text itself and finds the same stop string in the tokens it
gets: the text decoded here differs from its own at most by a leading space the prompt gives
the first token, and by invalid bytes it may drop where this shows U+FFFD, so a stop string
found here (one without U+FFFD, the only kind searched) is in the API server's text too.
"""

from __future__ import annotations

import bisect

from vllm.v1.engine.detokenizer import check_stop_strings

REPLACEMENT = "\ufffd"  # what bytes that end no character decode to


class StopStrings:
    def __init__(self, model_config):
        self.model_config = model_config
        self.tokenizer = None  # loaded with the first request that has stop strings

    def first_stop(self, request, new_token_ids: list[int]) -> tuple[int, str] | None:
        """(how many of `new_token_ids` to keep, the stop string they complete), or None when
        they complete none. `request` holds the output before them."""
        params = request.sampling_params
        stops = [stop for stop in (params.stop or ()) if REPLACEMENT not in stop] if params is not None else []
        if not new_token_ids or not stops or self.model_config.skip_tokenizer_init:
            return None
        before = list(request.output_token_ids)
        # vLLM looks for stop strings only once the output passes min_tokens, and then only for
        # one that ends after the text of the first min_tokens tokens.
        floor = max(params.min_tokens - len(before), 0)
        if floor >= len(new_token_ids):
            return None
        old = self._text(before + new_token_ids[:floor], params)

        def stop_after(kept: int) -> str | None:
            if kept <= floor:
                return None
            text = self._text(before + new_token_ids[:kept], params)
            found = check_stop_strings(text, max(len(text) - len(old), 0), stops, False)
            return found[0] if found else None

        if stop_after(len(new_token_ids)) is None:
            return None
        kept = fewest_tokens(len(new_token_ids), lambda count: stop_after(count) is not None)
        return kept, stop_after(kept)

    def _text(self, token_ids: list[int], params) -> str:
        """The detokenizer's text after `token_ids`: their decoding, less the trailing tokens
        whose bytes do not end a character yet (they decode to U+FFFD)."""
        if self.tokenizer is None:
            from vllm.tokenizers import cached_tokenizer_from_config

            self.tokenizer = cached_tokenizer_from_config(model_config=self.model_config)
        end = len(token_ids)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
        while end and text.endswith(REPLACEMENT):
            end -= 1
            text = self.tokenizer.decode(token_ids[:end], skip_special_tokens=params.skip_special_tokens)
        return text


def fewest_tokens(count: int, holds) -> int:
    """The fewest of `count` tokens (1..count) for which `holds(k)`, a property that stays true
    once true (text that holds a stop string holds it with more tokens); `count` holds."""
    return 1 + bisect.bisect_left(range(1, count + 1), True, key=holds)
