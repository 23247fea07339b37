"""The oracle tokenizers are the same in every process: a test checkpoint built from a tokenizer that varies
(as `WordPieceTrainer`'s did, huggingface/tokenizers#1794) is a different case on every run, so a test on it
passes or fails by chance. Built in two fresh processes (hash seeds differ) and compared."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_BUILD = """
import json
from tests.oracle.instructblip import build_qformer_tokenizer
from tests.oracle.t5 import build_t5_tokenizer
from tests.oracle.tokenizer import build_tokenizer
print(json.dumps({name: sorted(build().get_vocab().items()) for name, build in [
    ("qformer", build_qformer_tokenizer), ("t5", build_t5_tokenizer), ("opt", build_tokenizer)]}))
"""


def _vocabularies(hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", _BUILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_oracle_tokenizers_are_the_same_in_every_process():
    first, second = _vocabularies("1"), _vocabularies("2")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], f"the {name} oracle tokenizer differs between two processes"
