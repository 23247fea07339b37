"""The Qwen benchmark checkpoint's processor files: vLLM's Qwen2.5-VL processor loads a video processor even for
image-only prompts, so the checkpoint carries `video_preprocessor_config.json`; a checkpoint cached before that
file existed gets it from its own image processor config, without its weights being rewritten."""
import json

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from benchmarks.throughput_qwen import MIN_PIXELS, build_checkpoint
from fovea.multimodal.processors.configs import read_image_processor_config, read_video_processor_config
from fovea.multimodal.processors.qwen2_vl_image import Qwen2VLImageProcessor
from fovea.multimodal.processors.qwen2_vl_video import Qwen2VLVideoProcessor


def test_a_cached_checkpoint_without_the_video_config_is_upgraded(tmp_path):
    max_pixels = 28 * 28 * 64
    image_config = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=max_pixels).to_dict()
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor",
                                                                "image_processor": image_config}))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights as cached")  # stands for the cached weights: must not be rewritten

    assert build_checkpoint(tmp_path, max_pixels) == tmp_path
    assert weights.read_bytes() == b"weights as cached"
    written = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert written["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert written["size"] == {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}
    # fovea reads it (and refuses unknown options), with every option the image processor has
    video = Qwen2VLVideoProcessor.from_dict(read_video_processor_config(tmp_path)).to_dict()
    image = Qwen2VLImageProcessor.from_dict(read_image_processor_config(tmp_path)).to_dict()
    assert {k: v for k, v in video.items() if k in image and k != "image_processor_type"} == \
        {k: v for k, v in image.items() if k != "image_processor_type"}

    (tmp_path / "video_preprocessor_config.json").write_text("{}")  # present: left alone
    build_checkpoint(tmp_path, max_pixels)
    assert (tmp_path / "video_preprocessor_config.json").read_text() == "{}"
