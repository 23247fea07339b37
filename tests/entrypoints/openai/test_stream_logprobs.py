"""Streamed logprobs equal the whole reply's when text waits for the rest of a multi-byte character.

A tiny Llama whose byte-level tokenizer knows few merges of non-ASCII text: greedy output is mostly single
bytes, so characters are split across tokens and the detokenizer holds their bytes back. Each token's string
is its own bytes decoded alone (U+FFFD for a partial character, as vLLM reports it); the streamed chunks'
entries, concatenated, must be the non-streamed reply's, entry for entry.
"""
from __future__ import annotations

import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.entrypoints import ServerProcess
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.llama import llama_text_config, reinit_

# Non-ASCII text of 2, 3 and 4 bytes a character; few merges, so most of it stays single bytes.
CORPUS = ["héllo wörld café", "naïve résumé", "日本語のテキスト", "snow ☃ and 🙂 faces", "plain ascii words"] * 4
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
MAX_TOKENS = 24


def build_byte_llama(out_dir) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = llama_text_config(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    reinit_(model, 0, 1.5)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("byte_llama")
    build_byte_llama(model_dir)
    proc = ServerProcess(model_dir, "--num-kv-blocks", "128", log_dir=tmp_path_factory.mktemp("byte_llama_log"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


PROMPTS = ["日本", "café ☃", "🙂"]


FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
# echo: the completion's offsets follow the prompt's; stop: text held back for a stop string as well; n=2 and a
# list of prompts: several choices in one stream (n > 1 must sample: a seed makes both replies the same).
VARIANTS = {"plain": {}, "echo": {"echo": True}, "stop": {"stop": ["☃☃☃", "zz"]}, "n2": {"n": 2, "temperature": 0.8, "seed": 7}}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt", [*PROMPTS, PROMPTS])
def test_streamed_completion_logprobs_concatenate_to_the_whole_reply(client, model, prompt, variant):
    kwargs = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": 3,
              "extra_body": {"ignore_eos": True}, **VARIANTS[variant]}
    whole = sorted(client.completions.create(**kwargs).choices, key=lambda c: c.index)
    num_prompt_tokens = [len(c.logprobs.tokens) - MAX_TOKENS for c in whole]
    assert all(n == 0 for n in num_prompt_tokens) or variant == "echo"
    # the case under test: characters split over tokens
    assert any("\ufffd" in t for c in whole for t in c.logprobs.tokens[-MAX_TOKENS:])
    streamed = {c.index: {"text": "", **{name: [] for name in FIELDS}} for c in whole}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index]["text"] += choice.text
            if choice.logprobs is not None:
                for name in FIELDS:
                    streamed[choice.index][name] += getattr(choice.logprobs, name)
    for choice in whole:
        assert streamed[choice.index] == {"text": choice.text,
                                          **{name: getattr(choice.logprobs, name) for name in FIELDS}}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_chat_logprobs_concatenate_to_the_whole_reply(client, model, prompt):
    kwargs = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0.0,
                  logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert len(whole.logprobs.content) == MAX_TOKENS
    assert any("\ufffd" in e.token for e in whole.logprobs.content)
    text, content = "", []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                content += choice.logprobs.content
    assert text == whole.message.content
    assert [e.model_dump() for e in content] == [e.model_dump() for e in whole.logprobs.content]
