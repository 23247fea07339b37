"""End to end: a short stage-1 run on synthetic shapes, then retrieval on the held-out test split. Recall@1
must end well above the chance level the evaluation computes (a random ranking's expected recall)."""
import pytest
import torch

from fovea.eval.data import read_eval_images
from fovea.eval.retrieval import evaluate_retrieval
from fovea.training.config import TrainConfig
from fovea.training.scoring import ImageTextScorer
from fovea.training.shapes import generate_shapes
from fovea.training.trainer import train
from tests.training.tiny import model_json, qformer_tokenizer

MARGIN = 0.2  # absolute recall@1 above chance (chance is about 3% here)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = generate_shapes(folder / "shapes", 200, seed=0, image_size=32, splits=(0.8, 0.0, 0.2))
        qformer_tokenizer().save_pretrained(folder / "qtok")
        run = train(TrainConfig(stage="stage1", train_data=str(data["train"]), output_dir=str(folder / "run"),
                                model_config=model_json(folder / "model.json", hidden=64, num_query_tokens=8),
                                qformer_tokenizer=str(folder / "qtok"), batch_size=32, max_steps=300, warmup_steps=30,
                                lr=1e-3, max_text_len=20, save_every=10**6, progress=False))
        scorer = ImageTextScorer.from_pretrained(run.export_dir, max_text_len=20)
        return evaluate_retrieval(scorer, read_eval_images(data["test"]), k_rerank=10)
    finally:
        torch.set_num_threads(previous)


def test_recall_at_1_ends_well_above_chance(result):
    print(result.format())
    assert result.num_images == result.num_texts == 40
    assert result.chance["i2t_r1"] == pytest.approx(1 / 40) and result.chance["t2i_r10"] == pytest.approx(10 / 40)
    assert result.itc["i2t_r1"] > result.chance["i2t_r1"] + MARGIN
    assert result.itc["t2i_r1"] > result.chance["t2i_r1"] + MARGIN


def test_itm_only_reorders_the_itc_candidates(result):
    # re-ranking permutes each query's ITC top 10, so recall@10 cannot change
    assert result.reranked["i2t_r10"] == result.itc["i2t_r10"]
    assert result.reranked["t2i_r10"] == result.itc["t2i_r10"]
