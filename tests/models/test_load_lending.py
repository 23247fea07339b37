"""Loading lends the file's pages to the layers that repack them (one pass instead of a copy and a repack) and
copies out whatever a module keeps as it is: after loading, no tensor of the model lives in the checkpoint's
mapping (which would keep the file's pages in the process, or break if the file changed), whichever method runs,
and the weights equal the file's."""
from __future__ import annotations

import gc

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from fovea.layers.linear import Linear, LinearBase, PackedLinear, onednn_linear_available
from fovea.models import weights
from fovea.models.registry import resolve_model_class
from fovea.models.weights import build_model, load_model, load_weights
from tests.oracle.blip2 import build_tiny_blip2

DENSE_OPT_FC1 = "language_model.model.decoder.layers.0.fc1.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("lending"), seed=0)


def maps_of(path) -> list[str]:
    gc.collect()
    with open("/proc/self/maps") as f:
        return [line for line in f if str(path) in line]


def model_of(ckpt, dtype=torch.bfloat16) -> nn.Module:
    config = transformers.AutoConfig.from_pretrained(ckpt)
    return build_model(resolve_model_class(config.architectures), config, dtype)


def every_tensor(model: nn.Module):
    for module in model.modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers"):
                yield from ((f"{key}.{k}", v) for k, v in value.items() if v is not None)
            elif isinstance(value, torch.Tensor):
                yield key, value


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_no_tensor_stays_in_the_file_after_load_model(ckpt, kernels, monkeypatch):
    if kernels == "off":  # every layer keeps its dense weight: each lent one is copied out
        monkeypatch.setattr("fovea.layers.linear_methods.onednn_linear_available", lambda: False)
    elif not onednn_linear_available():
        pytest.skip("oneDNN is not in this torch build")
    config = transformers.AutoConfig.from_pretrained(ckpt)
    model, num_packed = load_model(resolve_model_class(config.architectures), config, ckpt, torch.bfloat16)
    assert (num_packed > 0) == (kernels == "auto")
    assert maps_of(ckpt / "model.safetensors") == []
    file = load_file(str(ckpt / "model.safetensors"))
    state = model.state_dict()
    for name in (DENSE_OPT_FC1, "vision_model.embeddings.patch_embedding.weight",
                 "language_model.model.decoder.final_layer_norm.weight"):
        torch.testing.assert_close(state[name], file[name].to(state[name].dtype), atol=0, rtol=0)


def test_a_method_that_keeps_the_weight_as_it_is_gets_a_copy(ckpt):
    """A linear method may keep the checkpoint's tensor itself (a plain-layout kernel): loading must still copy
    it out of the mapping, wherever on the module the method put it."""
    model = model_of(ckpt)
    kept: list[nn.Module] = []  # not the tensors: a view kept here would keep the mapping

    def keep_as_is(module: nn.Module) -> None:
        if isinstance(module, LinearBase):
            module.plain_weight = module.weight.detach()  # a view of the file's pages, if lent
            del module.weight
            kept.append(module)

    load_weights(model, ckpt, on_module_loaded=keep_as_is)
    assert kept
    assert maps_of(ckpt / "model.safetensors") == []
    file = load_file(str(ckpt / "model.safetensors"))
    fc1 = model.get_submodule(DENSE_OPT_FC1.rsplit(".", 1)[0])
    torch.testing.assert_close(fc1.plain_weight, file[DENSE_OPT_FC1].to(torch.bfloat16), atol=0, rtol=0)


def test_lent_pages_are_read_by_the_hook_not_copied_first(ckpt, monkeypatch):
    """A weight the file holds in the model's dtype reaches the hook as the file's own pages (no copy before
    the repack); one it must convert (float32 -> bfloat16) reaches it as a copy."""
    opened: list[weights.SafetensorsFile] = []

    class Recorded(weights.SafetensorsFile):
        def __init__(self, path):
            super().__init__(path)
            opened.append(self)

    monkeypatch.setattr(weights, "SafetensorsFile", Recorded)
    for dtype, lent in ((torch.float32, True), (torch.bfloat16, False)):  # the tiny checkpoint is float32
        in_file: list[bool] = []
        model = model_of(ckpt, dtype)
        # stacked from three tensors (qkv) they are always a copy; the Q-Former stays float32 in both
        lm_linears = {id(m) for m in model.language_model.modules()
                      if isinstance(m, LinearBase) and not isinstance(m, PackedLinear)}

        def hook(module: nn.Module) -> None:
            if id(module) in lm_linears:
                in_file.append(opened[-1].holds(module.weight))

        load_weights(model, ckpt, on_module_loaded=hook)
        assert in_file and all(x == lent for x in in_file), (dtype, in_file)
        assert maps_of(ckpt / "model.safetensors") == []


def test_building_a_model_draws_no_random_numbers_and_restores_init():
    """build_model leaves parameters unwritten (the checkpoint fills them), and torch.nn.init works after."""
    before = torch.random.get_rng_state()
    config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=1000, max_position_embeddings=64, word_embed_proj_dim=64)
    build_model(resolve_model_class(["OPTForCausalLM"]), config, torch.float32)
    assert torch.equal(torch.random.get_rng_state(), before)
    t = torch.zeros(1000)
    nn.init.normal_(t)
    assert t.std() > 0.5


_HUGE_PAGES_CHILD = r"""
import json, sys
import torch, transformers
from fovea.layers.linear import LinearBase
from fovea.layers.linear_methods import PanelLinearMethod, in_place_layers
from fovea.models.registry import resolve_model_class
from fovea.models.weights import huge_page_layers, load_model
from tests.memory_maps import advised_huge

ckpt, policy, cache_dir = sys.argv[1:4]
config = transformers.AutoConfig.from_pretrained(ckpt)
cache = None
if cache_dir != "off":  # the panels packed into the packed weights cache's files, and run from them
    from fovea.models.packed_cache import PackedWeightsCache
    cache = PackedWeightsCache.open(cache_dir, ckpt, torch.bfloat16)
# every layer packs its panels (the float32 file is converted anyway)
with in_place_layers("none"), huge_page_layers(policy):
    model, _ = load_model(resolve_model_class(config.architectures), config, ckpt, torch.bfloat16,
                          packed_cache=cache)
layers = {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}
packed = {name: m.packed_weight for name, m in layers.items() if isinstance(m.method, PanelLinearMethod)}
names = ["vision_model.encoder.layers.0.mlp.fc1", "language_model.model.decoder.layers.0.fc1",
         "language_model.model.decoder.layers.0.self_attn.qkv_proj"]
from fovea.models.safetensors_mmap import lies_in_a_file
print(json.dumps({"huge_pages": {name: m.huge_pages for name, m in layers.items()},
                  "in_cache": sorted({lies_in_a_file(t) for t in packed.values()}),
                  "advised": {name: advised_huge(packed[name]) for name in names if name in packed},
                  "nbytes": {name: packed[name].nbytes for name in names if name in packed}}))
"""


@pytest.mark.parametrize("policy,cached", [("language_model", False), ("none", False), ("auto", True),
                                           ("none", True)])
def test_the_language_model_packs_onto_the_pages_asked_for_and_the_encoders_onto_small_ones(tmp_path, policy,
                                                                                           cached):
    """Decode streams the language model's packed weights: 2 MiB pages under "language_model" (`fovea.models.
    weights.HUGE_PAGE_LAYERS`), ordinary ones under "none"; the vision tower and the projector run over many rows
    at once and always load onto ordinary pages, whose first write costs less on a VM whose host takes free memory
    back (`fovea.kernels.panels.empty_packed`). In a fresh process: in a long one, the allocator may hand out memory
    from a range an earlier allocation had advised. The same for the packed weights cache's file mappings, where
    "auto" means 2 MiB pages for the language model on any host (`huge_page_policy(..., cached=True)`)."""
    import json
    import subprocess
    import sys

    # wide enough that each packed weight spans a whole 2 MiB page (4 MiB of bfloat16)
    ckpt = build_tiny_blip2(tmp_path / "wide", vision_hidden=1024, text_hidden=1024, num_layers=1)
    result = subprocess.run([sys.executable, "-c", _HUGE_PAGES_CHILD, str(ckpt), policy,
                             str(tmp_path / "cache") if cached else "off"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    huge_lm = policy == "language_model" or (policy == "auto" and cached)
    assert seen["in_cache"] == [cached]
    for name, huge in seen["huge_pages"].items():
        assert huge == (huge_lm and name.startswith(("language_model.model.", "language_model.lm_head"))), name
    if not seen["advised"]:
        pytest.skip("this CPU runs no panel-packed bfloat16 kernel (neither AVX-512 BF16 nor AMX)")
    assert min(seen["nbytes"].values()) >= 4 << 20
    assert seen["advised"] == {"vision_model.encoder.layers.0.mlp.fc1": False,  # ordinary pages
                               "language_model.model.decoder.layers.0.fc1": huge_lm,
                               "language_model.model.decoder.layers.0.self_attn.qkv_proj": huge_lm}  # shard by shard


@pytest.mark.parametrize("reclaims", [True, False])
def test_auto_asks_for_huge_pages_unless_the_host_takes_freed_memory_back(monkeypatch, reclaims):
    from fovea.kernels import panels

    monkeypatch.setattr(panels, "host_reclaims_free_memory", lambda: reclaims)
    auto = "none" if reclaims else "language_model"
    assert weights.huge_page_policy("auto")[0] == auto
    # the packed weights cache writes its 2 MiB pages once, whatever the host: every later start maps them
    assert weights.huge_page_policy("auto", cached=True)[0] == "language_model"
    assert weights.huge_page_policy("none", cached=True)[0] == "none"
    for policy in weights.HUGE_PAGE_POLICIES:
        model = nn.ModuleDict({"language_model": Linear(8, 8), "vision": Linear(8, 8)})
        model.language_model_modules = ["language_model"]
        with weights.huge_page_layers(policy):
            weights.place_layers(model)
        resolved = auto if policy == "auto" else policy
        assert weights.huge_page_policy(policy)[0] == resolved
        assert model["language_model"].huge_pages == (resolved == "language_model"), policy
        assert model["language_model"].is_language_model
        assert not model["vision"].huge_pages and not model["vision"].is_language_model
    unnamed = nn.Sequential(Linear(8, 8))  # a model that names no language model: every layer counts as one
    with weights.huge_page_layers("language_model"):
        weights.place_layers(unnamed)
    assert unnamed[0].huge_pages and unnamed[0].is_language_model
    with pytest.raises(ValueError, match="huge page policy 'all'; allowed: 'auto', 'language_model', 'none'"):
        with weights.huge_page_layers("all"):
            pass


def test_a_balloon_with_free_page_reporting_is_a_host_that_takes_freed_memory_back(tmp_path):
    """Read from sysfs files as the kernel writes them (`features`: one character per feature bit, bit 0 first;
    free page reporting is bit 5 of the balloon, device 0x0005)."""
    from fovea.kernels.panels import host_reclaims_free_memory

    def machine(name: str, devices: dict[str, tuple[str, str]]) -> str:
        for device, (kind, features) in devices.items():
            (tmp_path / name / device).mkdir(parents=True)
            (tmp_path / name / device / "device").write_text(kind + "\n")
            (tmp_path / name / device / "features").write_text(features + "\n")
        return str(tmp_path / name)

    reporting = "01100101" + "0" * 24
    assert host_reclaims_free_memory(machine("balloon", {"virtio0": ("0x0005", reporting),
                                                         "virtio1": ("0x0002", "0" * 32)}))
    assert not host_reclaims_free_memory(machine("no_reporting", {"virtio0": ("0x0005", "0110000" + "0" * 25)}))
    assert not host_reclaims_free_memory(machine("block_only", {"virtio1": ("0x0002", reporting)}))
    assert not host_reclaims_free_memory(machine("unreadable", {"virtio0": ("balloon", reporting)}))
    assert not host_reclaims_free_memory(str(tmp_path / "no_virtio_bus"))
