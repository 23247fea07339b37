"""Ray Data: `fovea.ray.batch_generate` runs image rows through actors that each own an engine, and every row
equals `LLM.generate` on the same prompt and image."""
from __future__ import annotations

import numpy as np
import pytest

import fovea.ray
from fovea import LLM, SamplingParams
from tests.entrypoints import png_bytes, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.blip2 import build_tiny_blip2

OPTIONS = dict(dtype="float32", num_kv_blocks=256, block_size=4)
PARAMS = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return str(build_tiny_blip2(tmp_path_factory.mktemp("blip_ray_data"), seed=0))


@pytest.fixture(scope="module")
def llm(blip_dir):
    return LLM(blip_dir, num_threads=1, **OPTIONS)


def by_id(dataset) -> list[dict]:
    return sorted(dataset.take_all(), key=lambda row: row["id"])


def test_64_image_rows_through_2_actors_equal_llm_generate(ray_local, blip_dir, llm):
    images = [random_image(i, 20 + (i % 9) * 5, 24 + (i % 5) * 6) for i in range(64)]
    prompts = [f"a photo of {'two ' * (i % 4)}" for i in range(64)]
    rows = [{"id": i, "prompt": prompts[i], "image": png_bytes(images[i])} for i in range(64)]
    out = fovea.ray.batch_generate(ray_local.data.from_items(rows), model=blip_dir, sampling_params=PARAMS,
                                   concurrency=2, batch_size=8, **OPTIONS)
    got = by_id(out)
    expected = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)],
                            PARAMS, use_tqdm=False)
    assert [row["id"] for row in got] == list(range(64))  # every row comes back once
    assert [list(row["generated_token_ids"]) for row in got] == [list(e.outputs[0].token_ids) for e in expected]
    assert [row["generated_text"] for row in got] == [e.outputs[0].text for e in expected]
    assert [row["finish_reason"] for row in got] == [e.outputs[0].finish_reason for e in expected]
    assert [row["num_prompt_tokens"] for row in got] == [len(e.prompt_token_ids) for e in expected]
    assert len({tuple(row["generated_token_ids"]) for row in got}) > 8  # the images matter: outputs differ
    assert all(row["prompt"] == prompts[row["id"]] for row in got)  # input columns are kept


def test_paths_arrays_and_a_bad_row_with_continue_on_error(ray_local, blip_dir, llm, tmp_path):
    images = [random_image(100 + i, 32, 28) for i in range(6)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    rows = [{"id": i, "prompt": "a picture of", "path": str(tmp_path / f"{i}.png")} for i in range(6)]
    rows.append({"id": 6, "prompt": "a picture of", "path": str(tmp_path / "missing.png")})
    out = by_id(fovea.ray.batch_generate(ray_local.data.from_items(rows), model=blip_dir, sampling_params=PARAMS,
                                         image_column="path", continue_on_error=True, **OPTIONS))
    expected = llm.generate([{"prompt": "a picture of", "multi_modal_data": {"image": im}} for im in images],
                            PARAMS, use_tqdm=False)
    assert [list(row["generated_token_ids"]) for row in out[:6]] == [list(e.outputs[0].token_ids) for e in expected]
    assert [row["error"] for row in out[:6]] == [None] * 6
    assert "missing.png" in out[6]["error"] and out[6]["generated_text"] == "" and out[6]["finish_reason"] is None

    # (H, W, 3) arrays, as ray.data.read_images gives them, are images too
    arrays = [{"id": i, "prompt": "a picture of", "image": np.asarray(im)} for i, im in enumerate(images[:2])]
    got = by_id(fovea.ray.batch_generate(ray_local.data.from_items(arrays), model=blip_dir, sampling_params=PARAMS,
                                         **OPTIONS))
    assert [list(row["generated_token_ids"]) for row in got] == [list(e.outputs[0].token_ids) for e in expected[:2]]

    # without continue_on_error the bad row fails the job, naming the file
    with pytest.raises(Exception, match="missing.png"):
        fovea.ray.batch_generate(ray_local.data.from_items(rows[5:]), model=blip_dir, sampling_params=PARAMS,
                                 image_column="path", **OPTIONS).take_all()


def test_bad_options_fail_before_any_actor_starts(ray_local, blip_dir, tmp_path):
    dataset = ray_local.data.from_items([{"prompt": "a"}])
    with pytest.raises(TypeError, match="max_num_sequences"):
        fovea.ray.batch_generate(dataset, model=blip_dir, max_num_sequences=4)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fovea.ray.batch_generate(dataset, model=str(tmp_path))
    with pytest.raises(ValueError, match="one completion per row"):
        fovea.ray.batch_generate(dataset, model=blip_dir, sampling_params=SamplingParams(n=2))
