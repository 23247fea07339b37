"""Incremental detokenization and stop strings, one `IncrementalDetokenizer` per completion.

Decoding all output ids every step costs O(length) per token; this decodes a short window instead. Two
offsets into the ids cut the window: `prefix` .. `read` is text already emitted, kept as context (so a
decoder that treats the start of a string specially, like sentencepiece's leading space, sees the same
neighbours as in a full decode); `read` .. end is new. Each step decodes the window with and without the
new part and emits the difference, unless that ends in U+FFFD: then a multi-byte character is split across
tokens and the text waits for the rest of it. Where text is emitted the UTF-8 decoder is between characters,
so the pieces join to exactly what one decode of all the ids gives.
"""
from __future__ import annotations

from fovea.sampling_params import SamplingParams

# Prompt tokens decoded as context for the first output token.
NUM_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one completion's token ids into text as they arrive, and watches for stop strings.

    `tokenizer` is a Hugging Face tokenizer (`decode(ids, skip_special_tokens=...)`). Text is decoded without
    `clean_up_tokenization_spaces`, as vLLM does; transformers 5 skips that clean-up for BPE anyway.
    """

    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop)
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens

        self.output_token_ids: list[int] = []
        self.stop_string: str | None = None
        self.is_finished = False
        context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        context_text = self._decode(context) if context else ""
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character (ids given directly, not encoded text): its bytes would
            # merge with the output's, so the output is decoded on its own instead.
            context, context_text = [], ""
        self._ids = context  # context + decoded output ids
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = context_text  # decode of _ids[_prefix_offset:_read_offset], or None
        self._text = ""

    @property
    def output_text(self) -> str:
        """All text decoded so far; the final text once `is_finished`."""
        return self._text

    def update(self, new_token_ids: list[int], *, finished: bool = False, stop_terminated: bool = False) -> str | None:
        """Add this step's token ids; return the stop string if one matched (the text then ends before it,
        or after it under include_stop_str_in_output, and the completion is finished).

        `finished`: the engine ends the completion with these ids (length, EOS, stop token id), so text
        waiting for the rest of a character is flushed. `stop_terminated`: the last id is EOS or a stop
        token id, whose text is left out unless include_stop_str_in_output (as vLLM). It implies finished.
        """
        if self.is_finished:
            raise RuntimeError("update() after the completion finished")
        to_decode = new_token_ids
        if stop_terminated and new_token_ids and not self.include_stop_str_in_output:
            to_decode = new_token_ids[:-1]
        # Stop strings are searched from here on: the new text, and none of the first min_tokens tokens'.
        search_from = len(self._text)
        for token_id in to_decode:
            self.output_token_ids.append(token_id)
            self._ids.append(token_id)
            self._text += self._decode_next()
            if len(self.output_token_ids) <= self.min_tokens:
                search_from = len(self._text)
        self.output_token_ids.extend(new_token_ids[len(to_decode):])
        if finished or stop_terminated:
            self._text += self._flush()
            self.is_finished = True
        if self.stop and len(self.output_token_ids) > self.min_tokens:
            self.stop_string = self._match_stop(search_from)
            self.is_finished = self.is_finished or self.stop_string is not None
        return self.stop_string

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_next(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        # Waiting on U+FFFD is exact but not bounded: a run of invalid bytes keeps the window growing until a
        # clean token. Emitting early instead would split the UTF-8 decoder mid-character and break equality.
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        if self._prefix_offset >= 64:  # drop ids no window will read again (amortised O(1) per token)
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def _flush(self) -> str:
        """Text of ids still pending at the end. A trailing U+FFFD there is a character cut off by the end of
        the generation, not text, and is dropped."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):].rstrip(REPLACEMENT_CHAR)

    def _match_stop(self, search_from: int) -> str | None:
        """Find the earliest stop string that ends after `search_from` and cut the text there."""
        best_index, best_stop = -1, None
        for stop in self.stop:
            # A match ending in new text starts at most len(stop) - 1 characters before it.
            index = self._text.find(stop, max(0, search_from - len(stop) + 1))
            if index != -1 and (best_stop is None or index < best_index):
                best_index, best_stop = index, stop
        if best_stop is not None:
            end = best_index + len(best_stop) if self.include_stop_str_in_output else best_index
            self._text = self._text[:end]
        return best_stop
