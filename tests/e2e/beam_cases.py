"""Beam search test helpers shared by the decoder-only (test_beam_search.py) and encoder-decoder
(test_t5_beam_search.py) tests: transformers' beams, the comparison over k = 1, 3, 5 and every length-penalty /
early-stopping setting, and the EOS chosen from transformers' own beams."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from fovea import LLM, BeamSearchParams

ATOL = 1e-4
MAX_TOKENS = 7
SETTINGS = [(1.0, False), (0.6, True), (2.0, "never"), (-0.5, False)]  # (length_penalty, early_stopping)


def with_eos(src: Path, dst: Path, eos: int) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    if "text_config" in config or "eos_token_id" not in config:  # a text-only T5 has no text_config
        config.setdefault("text_config", {})["eos_token_id"] = eos
    if "eos_token_id" in config:
        config["eos_token_id"] = eos
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def hf_beams(generate, prompt_len: int, pad: int, k: int, eos: int | None, length_penalty=1.0,
             early_stopping=False) -> list[tuple[list[int], float]]:
    """transformers' returned beams: (generated ids up to and with EOS, sequences_score), best first."""
    config = GenerationConfig(num_beams=k, num_return_sequences=k, do_sample=False, max_new_tokens=MAX_TOKENS,
                              eos_token_id=eos, pad_token_id=pad, length_penalty=length_penalty,
                              early_stopping=early_stopping, output_logits=True, output_scores=True,
                              return_dict_in_generate=True)
    out = generate(config)
    beams = []
    for i in range(k):
        ids = out.sequences[i, prompt_len:].tolist()
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos) + 1]
        if k == 1:  # greedy search: its score is the same formula over its raw logits
            lp = sum(torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ids))
            score = lp / len(ids) ** length_penalty
        else:
            score = out.sequences_scores[i].item()
        beams.append((ids, score))
    return beams


def check(llm: LLM, prompts, generates, prompt_lens, pad, eos, finish_reasons: set) -> None:
    for k in (1, 3, 5):
        for length_penalty, early_stopping in SETTINGS if k > 1 else SETTINGS[:1]:
            params = BeamSearchParams(beam_width=k, max_tokens=MAX_TOKENS, length_penalty=length_penalty,
                                      early_stopping=early_stopping)
            outs = llm.beam_search(prompts, params)
            for out, generate, prompt_len in zip(outs, generates, prompt_lens):
                want = hf_beams(generate, prompt_len, pad, k, eos, length_penalty, early_stopping)
                got = [(s.tokens[prompt_len:], s.score) for s in out.sequences]
                label = f"k={k} length_penalty={length_penalty} early_stopping={early_stopping}"
                assert [ids for ids, _ in got] == [ids for ids, _ in want][:len(got)], label
                assert len(got) == k or early_stopping is True, label
                for (_, a), (_, b) in zip(got, want):
                    assert a == pytest.approx(b, abs=ATOL), label
                for s in out.sequences:
                    ended = s.tokens[-1] == eos
                    assert s.finish_reason == ("stop" if ended else "length")
                    assert s.cum_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(
                        s.logprobs, s.tokens[prompt_len:])), abs=1e-5)
                    finish_reasons.add(s.finish_reason)
    scheduler = llm.llm_engine.scheduler
    assert not scheduler.held and scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_usable_blocks


def pick_eos(beams: list[tuple[list[int], float]]) -> int:
    """A token in the middle of the best beam that not every beam has there."""
    best = beams[0][0]
    for t in best[2:-2]:
        if not all(t in ids for ids, _ in beams):
            return t
    raise AssertionError(f"no token to use as EOS in {beams}")


def record_steps(llm: LLM) -> list:
    """Every SchedulerOutput the engine's (in-process) runner executes from now on, in order."""
    runner = llm.llm_engine.engine_core.runner
    steps = []
    execute = runner.execute

    def spy(out):
        steps.append(out)
        return execute(out)

    runner.execute = spy
    return steps
