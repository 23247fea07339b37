"""End to end: the stage-1 model `fovea train stage1` writes, served by `fovea serve`, gives through /v1/embeddings
the same retrieval recall@1 as `fovea eval retrieval` offline; /score equals LLM.score; refusals are 400s."""
import json

import httpx
import pytest
import torch

from fovea import LLM
from fovea.eval.__main__ import main as eval_main
from fovea.eval.data import read_eval_images
from fovea.eval.metrics import recall_at_k
from fovea.training.config import TrainConfig
from fovea.training.scoring import ImageTextScorer
from fovea.training.shapes import generate_shapes
from fovea.training.trainer import train
from tests.entrypoints import ServerProcess, data_url
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.training.tiny import model_json, qformer_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("retrieval_server")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = generate_shapes(folder / "shapes", 60, seed=1, image_size=32, splits=(0.7, 0.0, 0.3))
        qformer_tokenizer().save_pretrained(folder / "qtok")
        run = train(TrainConfig(stage="stage1", train_data=str(data["train"]), output_dir=str(folder / "run"),
                                model_config=model_json(folder / "model.json"), qformer_tokenizer=str(folder / "qtok"),
                                batch_size=16, max_steps=30, warmup_steps=5, lr=1e-3, max_text_len=20,
                                save_every=10**6, progress=False))
    finally:
        torch.set_num_threads(previous)
    return run.export_dir, data["test"]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    proc = ServerProcess(trained[0], "--served-model-name", "stage1", log_dir=tmp_path_factory.mktemp("log"))
    yield proc
    proc.stop()


def post(server, path, body):
    return httpx.post(server.base_url + path, json=body, timeout=300)


def image_part(image):
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def test_recall_through_the_server_equals_offline_eval(trained, server, capsys):
    export, test_split = trained
    assert eval_main(["retrieval", "--model", str(export), "--data", str(test_split), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["itc"]

    items = read_eval_images(test_split)
    texts, text_image = [], []
    for index, item in enumerate(items):
        texts.extend(item.captions)
        text_image.extend([index] * len(item.captions))
    reply = post(server, "/v1/embeddings", {"input": [image_part(item.load()) for item in items] + texts})
    assert reply.status_code == 200, reply.text
    data = [torch.tensor(d["embedding"]) for d in reply.json()["data"]]
    images, text_emb = torch.stack(data[:len(items)]), torch.cat(data[len(items):])  # (N, Q, E), (M, E)
    itc = torch.einsum("nqe,me->nmq", images, text_emb).amax(dim=-1)
    image_relevant = [{t for t, i in enumerate(text_image) if i == n} for n in range(len(items))]
    served = {}
    for k in (1, 5, 10):
        served[f"i2t_r{k}"] = recall_at_k(itc.argsort(dim=1, descending=True).tolist(), image_relevant, k)
        served[f"t2i_r{k}"] = recall_at_k(itc.T.argsort(dim=1, descending=True).tolist(), [{i} for i in text_image], k)
    print(f"recall offline {offline}, served {served}")
    assert len(items) == 18 and served == offline  # recall@1, 5 and 10 both ways
    # 30 steps leave recall near chance and the scores close together (spread ~5e-4, still 50x the tolerance),
    # so the similarity matrix itself is checked too, against the offline scorer's
    scorer = ImageTextScorer.from_pretrained(export)
    want = scorer.itc_scores(scorer.embed_images([item.load() for item in items]), scorer.embed_texts(texts))
    torch.testing.assert_close(itc, want, atol=1e-5, rtol=1e-5)
    assert want.std() > 1e-4


@pytest.mark.parametrize("method", ["itc", "itm"])
def test_score_endpoint_equals_llm_score(trained, server, method):
    items = read_eval_images(trained[1])[:3]
    images = [item.load() for item in items]
    texts = [item.captions[0] for item in items]
    llm = LLM(str(trained[0]))
    want = [o.outputs.score for o in llm.score(images[0], texts, method=method)]
    reply = post(server, "/score", {"model": "stage1", "text_1": image_part(images[0]), "text_2": texts,
                                    "method": method})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["data"][0]["object"] == "score"
    assert [d["score"] for d in body["data"]] == pytest.approx(want, abs=1e-6)
    pairwise = post(server, "/v1/score", {"text_1": [image_part(i) for i in images], "text_2": texts,
                                          "method": method}).json()["data"]
    want_pairs = [o.outputs.score for o in llm.score(images, texts, method=method)]
    assert [d["score"] for d in pairwise] == pytest.approx(want_pairs, abs=1e-6)


@pytest.mark.parametrize("path, body, message", [
    ("/v1/embeddings", {"input": ["two circles"], "pooling": "projected"}, "unknown pooling 'projected'"),
    ("/score", {"text_1": [], "text_2": "a"}, "must not be empty"),
    ("/score", {"text_1": {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                "text_2": "a", "method": "cosine"}, "could not decode"),
    ("/v1/embeddings", {"input": [" ".join(["circle"] * 40)]}, "this model reads at most 32"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None),
])
def test_bad_requests_are_refused(server, path, body, message):
    reply = post(server, path, body)
    if message is None:  # no generation routes on a retrieval server
        assert reply.status_code == 404
        return
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]["message"]


def test_unknown_score_method_is_a_400_naming_the_choices(trained, server):
    image = read_eval_images(trained[1])[0].load()
    reply = post(server, "/score", {"text_1": image_part(image), "text_2": "a", "method": "cosine"})
    assert reply.status_code == 400
    assert "unknown score method 'cosine'; choose one of itc, itm" in reply.json()["error"]["message"]
