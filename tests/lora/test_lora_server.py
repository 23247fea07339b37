"""`fovea serve --lora-modules`: two adapters side by side with the base model on a real server with a real
client. Each name is listed by /v1/models, `model=name` picks the adapter (outputs equal `LLM.generate` with the
same LoRARequest, which test_lora_qwen2 checks against PEFT), and an unknown name is OpenAI's 404."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from fovea import LLM, SamplingParams
from tests.entrypoints import ServerProcess
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)

PROMPTS = ["the cat sat on the mat", "one two three four five"]


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    base, _, loras = setup
    proc = ServerProcess(base, "--served-model-name", "base", "--lora-modules",
                         f"attn={loras['attn'].lora_path}", f"mlp={loras['mlp'].lora_path}",
                         "--max-loras", "2", "--max-lora-rank", "8", "--num-kv-blocks", "128",
                         log_dir=tmp_path_factory.mktemp("lora_server_log"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_base_and_each_adapter(client, setup):
    _, _, loras = setup
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["base", "attn", "mlp"]
    assert cards["attn"].root == loras["attn"].lora_path and cards["attn"].parent == "base"
    assert cards["mlp"].parent == "base" and getattr(cards["base"], "parent", None) is None


def test_adapters_side_by_side_equal_offline_lora_requests(client, setup):
    base, _, loras = setup
    llm = LLM(str(base), dtype="float32", num_kv_blocks=128, enable_lora=True, max_loras=2, max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    names = ["base", "attn", "mlp"]
    jobs = [(name, prompt) for name in names for prompt in PROMPTS]
    expected = llm.generate([p for _, p in jobs], params, lora_request=[loras.get(n) for n, _ in jobs],
                            use_tqdm=False)

    def complete(job):
        name, prompt = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0.0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: the engine batches them together
        texts = list(pool.map(complete, jobs))
    assert texts == [e.outputs[0].text for e in expected]
    assert len(set(texts[0::2])) == 3  # base and the two adapters differ on the same prompt

    chat = client.chat.completions.create(model="mlp", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8, temperature=0.0)
    offline = llm.chat([{"role": "user", "content": PROMPTS[0]}], SamplingParams(temperature=0.0, max_tokens=8),
                       lora_request=loras["mlp"], use_tqdm=False)
    assert chat.model == "mlp" and chat.choices[0].message.content == offline[0].outputs[0].text


def test_unknown_model_is_a_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    error = info.value.body
    assert info.value.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert "attn" in error["message"] and "mlp" in error["message"]


def test_a_bad_adapter_stops_the_server_from_starting(setup, tmp_path):
    base, _, _ = setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="no adapter_config.json"):
        ServerProcess(base, "--lora-modules", f"bad={tmp_path / 'empty'}", "--num-kv-blocks", "64",
                      log_dir=tmp_path)


def test_lora_modules_flag_takes_name_equals_path(capsys):
    from fovea.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--lora-modules", "a=/x/a", "b=/y/b=c", "--max-loras", "2"])
    assert args.lora_modules == [("a", "/x/a"), ("b", "/y/b=c")] and args.max_loras == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--lora-modules", "just-a-path"])
    assert "'just-a-path' is not NAME=PATH" in capsys.readouterr().err
