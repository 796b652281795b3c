"""Which of brainfm's torch features the running torch has: ``python -m brainfm.bench.torch_features``.

brainfm pins ``torch==2.13.0`` (pyproject.toml; ``make install``), but a GPU machine brings its own
torch (``make gpu-check`` installs brainfm beside the image's torch, never over it), which may be older.
This module names each torch feature brainfm uses on a GPU, the first torch release that has it, and
probes the running torch for it; the ``cuda`` tests skip, with this reason, what the probe finds missing.

What needs torch 2.13 itself: nothing on a GPU. brainfm's code has no torch version check; where it
names 2.13 it describes what was measured on the pinned CPU build, none of which concerns CUDA:

- FlexAttention has no backward on the CPU (``model.attention_backend=flex`` trains on GPUs only;
  ``swin4d.WindowAttention4D`` refuses CPU training);
- the fused AdamW kernel exists for the CPU since torch 2.4 (``tasks/optim.py``; on CUDA since 2.0);
- TorchDynamo's ``allow_rnn`` fails on the CPU (``aten.mkldnn_rnn_layer``), so compiled LSTM
  autoencoders run their ``nn.LSTM`` layers eagerly (``models/lstm.py``);
- ``torch.distributed.nn.functional`` is marked deprecated in 2.13 (``tasks/distributed.py``; a warning only).

The first releases below are PyTorch's release notes'; the probes, not the version numbers, decide
what is skipped (a backport or a build without Triton shows up in the probe).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from brainfm.io import atomic_write_text


@dataclass(frozen=True)
class TorchFeature:
    """A torch feature brainfm uses: ``key``, the brainfm setting that uses it (``used_by``), the torch
    API (``api``), the first torch release with it (``since``) and a probe returning ``None`` when the
    running torch has it, else why not."""

    key: str
    used_by: str
    api: str
    since: str
    probe: Callable[[], str | None]


def _import_probe(module: str, *names: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            return f"{module} does not import ({exc})"
        missing = [n for n in names if not hasattr(mod, n)]
        return f"{module} has no {', '.join(missing)}" if missing else None

    return probe


def _fused_adamw_cuda() -> str | None:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError as exc:
        return f"torch.optim has no fused-kernel registry ({exc})"
    devices = _get_fused_kernels_supported_devices()
    return None if "cuda" in devices else f"fused optimizer kernels only for {devices}"


def _compile_cuda() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile does not exist"
    # Inductor's CPU kernels are C++; Triton matters where there is a GPU
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
        return "Triton is not installed (Inductor's GPU kernels need it)"
    return None


FEATURES: tuple[TorchFeature, ...] = (
    TorchFeature("flex_attention", "Swin4D model.attention_backend=flex (forward and backward on GPUs)",
                 "torch.nn.attention.flex_attention", "2.5",
                 _import_probe("torch.nn.attention.flex_attention", "flex_attention", "create_block_mask")),
    TorchFeature("compile", "trainer.compile=true (compiled backbone regions) and FlexAttention's fused kernel",
                 "torch.compile + Triton", "2.0", _compile_cuda),
    TorchFeature("fused_adamw", "task.optimizer.fused=auto or true (one AdamW kernel over all parameters)",
                 "torch.optim.AdamW(fused=True) on CUDA", "2.0", _fused_adamw_cuda),
    TorchFeature("autocast_dtype", "Swin4D window masks in the compute dtype under bf16-mixed / 16-mixed",
                 "torch.get_autocast_dtype", "2.4", _import_probe("torch", "get_autocast_dtype")),
    TorchFeature("safe_globals", "brainfm-convert of Lightning 1.x checkpoints (weights_only loading)",
                 "torch.serialization.safe_globals", "2.5", _import_probe("torch.serialization", "safe_globals")),
    TorchFeature("fully_shard", "trainer=fsdp (FSDP2)", "torch.distributed.fsdp.fully_shard", "2.6",
                 _import_probe("torch.distributed.fsdp", "fully_shard")),
)
_BY_KEY = {f.key: f for f in FEATURES}


def missing(key: str) -> str | None:
    """Why the running torch lacks feature ``key`` (:data:`FEATURES`), or ``None`` when it has it.

    Raises:
        KeyError: ``key`` is not a known feature.
    """
    if key not in _BY_KEY:
        raise KeyError(f"unknown torch feature {key!r}; known: {', '.join(_BY_KEY)}")
    feature = _BY_KEY[key]
    why = feature.probe()
    return None if why is None else f"torch {torch.__version__} lacks {feature.api} (since torch {feature.since}): {why}"


def pinned_torch() -> str | None:
    """The torch version brainfm's installed metadata pins (``torch==X``), or None."""
    try:
        requires = importlib.metadata.requires("brainfm") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for req in requires:
        m = re.fullmatch(r"torch\s*==\s*([\w.+]+)", req.split(";")[0].strip())
        if m:
            return m.group(1)
    return None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def report() -> str:
    """A Markdown report: the running torch against brainfm's pin, and each feature's probe."""
    pin = pinned_torch()
    running = torch.__version__
    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else "no CUDA device")
    lines = [f"torch {running} ({cuda}); brainfm pins torch {pin or 'n/a (brainfm metadata not found)'}"]
    if pin and _release(running) < _release(pin):
        lines.append(f"The running torch is older than the pin. No brainfm feature on a GPU needs torch >= {pin}: "
                     "the code has no version check, and what it says of 2.13 concerns the CPU "
                     "(brainfm.bench.torch_features explains); the features below are probed.")
    lines += ["", "| feature | used by | since | here |", "|---|---|---|---|"]
    probes = {f.key: f.probe() for f in FEATURES}
    for f in FEATURES:
        why = probes[f.key]
        lines.append(f"| `{f.api}` | {f.used_by} | {f.since} | {'yes' if why is None else f'MISSING: {why}'} |")
    absent = [key for key, why in probes.items() if why is not None]
    lines += ["", f"missing, their tests skipped: {', '.join(absent)}" if absent else "every feature is present"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Which of brainfm's torch features the running torch has.")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = parser.parse_args()
    text = report()
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
