"""Offline batch inference over a Ray Dataset: `batch_generate(dataset, model=...)`.

    import ray, fovea.ray
    ds = ray.data.from_items([{"prompt": "<image>a photo of", "image": png_bytes}, ...])   # or read_images, ...
    out = fovea.ray.batch_generate(ds, model="path/to/blip2", sampling_params=SamplingParams(max_tokens=30),
                                   concurrency=2, dtype="bfloat16")
    out.write_parquet("captions/")        # the input columns + generated_text, generated_token_ids, ...

The dataset's batches go through `map_batches` to a fixed pool of `concurrency` actors, each of which owns one
fovea engine (`LLM(model, **engine_options)`, loaded once per actor) and runs its whole batch through the
engine at once (continuous batching inside the actor). The result is a lazy Dataset like any `map_batches`.

A row is a prompt (the text `LLM.generate` takes, with the model's image placeholder) and its images, in the
columns `prompt_column` and `image_column`. An image cell is one image or a list of them, each one of: encoded
bytes (PNG, JPEG...), a file path, an (H, W, 3) uint8 array (what `ray.data.read_images` gives), or a dict with
"bytes" or "path" (the Hugging Face datasets Image feature); a missing image column or a None cell is a
text-only row. Rows keep their input columns and gain:

    generated_text        str        the completion (of SamplingParams.n == 1: one completion per row)
    generated_token_ids   list[int]
    finish_reason         str        "stop" or "length" (None for a failed row)
    num_prompt_tokens     int        placeholders of the images included
    error                 str        only with continue_on_error=True: why the row failed, else None

A bad row (an image that does not decode, a prompt over max_model_len, ...) fails the job with a ValueError
naming the row's prompt, as `LLM.generate` does; with `continue_on_error=True` it is written with its `error`
and the other rows finish normally (nothing is dropped).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fovea.entrypoints.ray._require import require_ray
from fovea.sampling_params import SamplingParams

OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "finish_reason", "num_prompt_tokens")
_SHOWN_PROMPT_CHARS = 60


def batch_generate(
    dataset,
    *,
    model: str,
    sampling_params: SamplingParams | None = None,
    concurrency: int = 1,
    batch_size: int = 16,
    num_cpus: float = 1.0,
    prompt_column: str = "prompt",
    image_column: str = "image",
    continue_on_error: bool = False,
    **engine_options: Any,
):
    """Generate for every row of `dataset` (a `ray.data.Dataset`); returns the rows with the output columns.

    `concurrency` actors each hold one engine and ask Ray for `num_cpus` CPUs; `num_threads` (an engine option)
    defaults to that count, so actors do not oversubscribe the cores they were given. `batch_size` rows go to
    an actor at a time. Every other keyword is an `EngineConfig` field (`dtype`, `max_model_len`, ...),
    checked here, before any actor starts.
    """
    require_ray("fovea.ray.batch_generate", "ray.data")
    from fovea.config import EngineConfig

    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {model!r} (a directory with config.json, as save_pretrained "
                                f"writes it)")
    sampling_params = sampling_params or SamplingParams()
    if not isinstance(sampling_params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
    if sampling_params.n != 1:
        raise ValueError(f"batch_generate writes one completion per row; got SamplingParams.n={sampling_params.n} "
                         f"(repeat the rows, with seeds, for several)")
    if concurrency < 1 or batch_size < 1 or not num_cpus > 0:
        raise ValueError(f"concurrency and batch_size must be >= 1 and num_cpus > 0; got concurrency="
                         f"{concurrency}, batch_size={batch_size}, num_cpus={num_cpus}")
    engine_options.setdefault("num_threads", max(1, int(num_cpus)))
    EngineConfig.from_kwargs(model, **engine_options)  # an unknown or bad option fails now, naming the valid ones
    return dataset.map_batches(
        GenerateActor, batch_format="numpy", batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus,
        fn_constructor_kwargs=dict(model=model, engine_options=engine_options, sampling_params=sampling_params,
                                   prompt_column=prompt_column, image_column=image_column,
                                   continue_on_error=continue_on_error))


class GenerateActor:
    """One Ray Data actor: one engine, loaded once, fed whole batches."""

    def __init__(self, *, model: str, engine_options: dict[str, Any], sampling_params: SamplingParams,
                 prompt_column: str, image_column: str, continue_on_error: bool):
        from fovea import LLM

        self.engine = LLM(model, **engine_options).llm_engine
        self.params = sampling_params
        self.prompt_column, self.image_column = prompt_column, image_column
        self.continue_on_error = continue_on_error
        self._num_requests = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.prompt_column not in batch:
            raise ValueError(f"the dataset has no prompt column {self.prompt_column!r}; its columns are "
                             f"{sorted(batch)} (pass prompt_column=)")
        prompts = batch[self.prompt_column]
        images = batch.get(self.image_column)
        num_rows = len(prompts)
        errors: list[str | None] = [None] * num_rows
        row_of: dict[str, int] = {}  # request id -> row in the batch
        for row in range(num_rows):
            request_id = f"row-{self._num_requests}"
            self._num_requests += 1
            try:
                prompt = _row_prompt(prompts[row], None if images is None else images[row], self.prompt_column)
                self.engine.add_request(request_id, prompt, self.params)
            except ValueError as err:
                shown = str(prompts[row])[:_SHOWN_PROMPT_CHARS]
                message = f"row with {self.prompt_column}={shown!r}: {err}"
                if not self.continue_on_error:
                    self.engine.abort_request(list(row_of))
                    raise ValueError(message) from err
                errors[row] = message
                continue
            row_of[request_id] = row
        finished = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[row_of[output.request_id]] = output
        texts, token_ids, reasons, num_prompt_tokens = [], [], [], []
        for row in range(num_rows):
            output = finished.get(row)
            completion = output.outputs[0] if output is not None else None
            texts.append(completion.text if completion else "")
            token_ids.append(np.asarray(completion.token_ids if completion else [], dtype=np.int64))
            reasons.append(completion.finish_reason if completion else None)
            num_prompt_tokens.append(len(output.prompt_token_ids) if output is not None else 0)
        out = dict(batch)
        out.update(generated_text=np.array(texts, dtype=object), generated_token_ids=_object_array(token_ids),
                   finish_reason=np.array(reasons, dtype=object),
                   num_prompt_tokens=np.array(num_prompt_tokens, dtype=np.int64))
        if self.continue_on_error:
            out["error"] = np.array(errors, dtype=object)
        return out


def _row_prompt(prompt: Any, images: Any, prompt_column: str) -> dict[str, Any]:
    if not isinstance(prompt, str):
        raise ValueError(f"{prompt_column} must be a string (the prompt, with the model's image placeholder), got "
                         f"{type(prompt).__name__}")
    items = _image_items(images)
    request: dict[str, Any] = {"prompt": prompt}
    if items:
        request["multi_modal_data"] = {"image": items if len(items) > 1 else items[0]}
    return request


def _image_items(cell: Any) -> list[Any]:
    """One dataset cell -> the images `load_image` takes. An (H, W, C) array is one image, (N, H, W, C) several."""
    if cell is None:
        return []
    if isinstance(cell, np.ndarray) and cell.dtype != object:
        return [cell] if cell.ndim in (2, 3) else list(cell)
    if isinstance(cell, Mapping):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        if cell.get("bytes") is not None:
            return [cell["bytes"]]
        if cell.get("path") is not None:
            return [cell["path"]]
        raise ValueError(f"an image given as a dict needs 'bytes' or 'path', got keys {sorted(cell)}")
    if isinstance(cell, (list, tuple)) or isinstance(cell, np.ndarray):  # an object array: a list of images
        return [item for element in cell for item in _image_items(element)]
    return [cell]  # bytes, a path, a PIL image: load_image says if it is none of what it takes


def _object_array(values: list) -> np.ndarray:
    # np.array(list of arrays) would stack equal-length rows into a 2-D array; a column of lists needs objects
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array
