"""Attribution maps of a fine-tuned model: which voxels x TRs (volume models) or ROIs x TRs (sequence
models) a prediction rests on (``brainfm-interpret``).

Methods (computed with captum, https://captum.ai):

- ``integrated_gradients``: Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017, "Axiomatic
  attribution for deep networks"), ``captum.attr.IntegratedGradients`` with Gauss-Legendre
  quadrature of ``n_steps`` points between a baseline ``x'`` and the input ``x``. Completeness: the
  attributions of a window sum to ``f(x) - f(x')`` up to the quadrature error, which is returned as
  ``delta`` (captum's convergence delta, ``sum(attributions) - (f(x) - f(x'))``).
- ``smoothgrad``: SmoothGrad over Integrated Gradients (Smilkov et al. 2017, "SmoothGrad: removing
  noise by adding noise"), ``captum.attr.NoiseTunnel(IntegratedGradients)``: the mean
  (``nt_type=smoothgrad``; ``smoothgrad_sq``: of the squares, ``vargrad``: the variance) of the IG maps of
  ``nt_samples`` copies of the input with Gaussian noise of standard deviation ``stdevs`` (absolute, in
  the input's units: z-scored BOLD, so 0.1-0.2 is 10-20 % of a standard deviation). Its ``delta`` is
  ``sum(attributions) - (f(x) - f(x'))`` of the clean input: not ~0 (the maps average noisy inputs).

SwiFT's ``interpretation/integrated_gradient.py`` (Kim et al., NeurIPS 2023) runs the same captum
pair on its classifier's logit, with the background intensity as the baseline, one ``.pt`` file per
subject; here the baseline is ``zeros`` (the mean of z-scored data) by default or ``background`` (the
run's stored background value, SwiFT's choice), and the maps are written as NIfTI in the scan's own
space (volumes) or as ROI x time HDF5 with the ROI names and a PNG heatmap (sequences).

What is explained (:func:`scores`) is the fine-tuned head's output (the task contract's
:meth:`~brainfm.tasks.base.BrainfmTask.head_output`), never a probability (softmax and sigmoid saturate,
and IG's completeness is then about a flat function): the class logit (``multiclass``), the log-odds of
the class (``binary``: class 1 is the logit, class 0 its negative), the prediction in the label's own
units (``regression``: ``output * label_std + label_mean``). Every task with a trained prediction head
is explained, window by window: ``task=supervised``, ``task=decoding`` (whose per-window labels
brainfm-predict refuses to average per subject) and a fine-tuned R2T model. A checkpoint without a
trained prediction head (self-supervised pretraining, R2T trained ``task.mode=self_supervised``) is
refused, as brainfm-predict refuses it (both ask :attr:`~brainfm.tasks.base.BrainfmTask.has_prediction_head`), unless
``output="embedding_norm"`` asks for the attribution of the L2 norm of the pooled embedding
(:func:`brainfm.tasks.supervised.pooled_embedding`), which says what the backbone responds to but
explains no prediction.

Memory: IG evaluates ``n_steps`` scaled copies of every input (``nt_samples`` times more for
SmoothGrad); ``internal_batch_size`` bounds how many go through the model at once (a 96^3 x 20 SwiFT
clip is 70 MB in float32).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.data.stores.volume import CropPad
from brainfm.data.windows import collate_windows
from brainfm.errors import ConfigError, DataError
from brainfm.eval.extract import write_csv
from brainfm.io import atomic_path, save_figure
from brainfm.runs import datamodules_of, has_split, load_run, window_dataset
from brainfm.tasks.supervised import pooled_embedding

log = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "smoothgrad")
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")
OUTPUTS = ("head", "embedding_norm")
BASELINES = ("zeros", "background")
GRIDS = ("original", "model")
#: the columns of ``attributions.csv`` (one row per explained window and target)
INDEX_COLUMNS = ("dataset", "split", "window", "subject_id", "run", "run_id", "window_start_tr", "window_start_s",
                 "tr", "method", "target", "target_name", "output", "baseline_output", "attribution_sum", "delta",
                 "relative_delta", "outside_sum", "file")


@contextmanager
def _quiet_captum():
    """Silence what captum says on every call that is not the user's concern (each explained here)."""
    with warnings.catch_warnings():
        # captum's gradient helper warns "Input Tensor 0 did not already require gradients, required_grads has
        # been set automatically" when a caller's input does not require grad; brainfm's batches never do, on
        # purpose (captum differentiates its own scaled/noisy copies of them), so the note says nothing.
        warnings.filterwarnings("ignore", message=r".*did not already require gradients.*")
        yield


# -- what is explained ---------------------------------------------------------------------------------------
def output_names(task, output: str = "head", categories: Sequence[str] | None = None) -> list[str]:
    """The name of every explained output index: class names (``categories`` when their count fits,
    else ``class<k>``), ``prediction`` (regression; ``prediction_<target>`` for each of several targets, as
    brainfm-predict's columns) or ``embedding_norm``."""
    if output == "embedding_norm":
        return ["embedding_norm"]
    kind = getattr(task, "kind", "multiclass")
    if kind == "regression":
        targets = list(getattr(task, "targets", None) or [])  # R2T: one output per target
        return [f"prediction_{t}" for t in targets] if len(targets) > 1 else ["prediction"]
    n = 2 if kind == "binary" else int(getattr(task, "num_classes", None) or task.objective_hparams()["num_classes"])
    if categories and len(categories) == n:
        return [str(c) for c in categories]
    return [f"class{k}" for k in range(n)]


def scores(task, output: str = "head") -> Callable[..., torch.Tensor]:
    """``f(x, *other inputs) -> (B, K)``: the quantities the attributions explain, for captum.

    ``x`` is the first of the backbone's inputs (``model.input_keys[0]``: ``volume`` ``(B, C, X, Y, Z, T)``
    or ``bold`` ``(B, T, n_rois)``); the other inputs (``t``: ``(B, T)`` seconds) follow in their order and
    are not attributed. ``K``: classes (``binary``: 2, ``[-logit, logit]``, the log-odds of each class),
    1 for regression (the prediction in label units) and for ``embedding_norm``.

    The head's output is the task contract's (:meth:`brainfm.tasks.base.BrainfmTask.head_output`), for any
    task with a trained prediction head (:attr:`~brainfm.tasks.base.BrainfmTask.has_prediction_head`):
    ``task=supervised``, ``task=decoding`` (a label per window: what brainfm-predict leaves to this command),
    R2T fine-tuned (its head on the rest embedding).

    Raises:
        ConfigError: ``output`` unknown, or ``head`` for a task without a trained prediction head.
    """
    if output not in OUTPUTS:
        raise ConfigError(f"output={output!r} must be one of {OUTPUTS}")
    keys = tuple(task.model.input_keys)
    if output == "embedding_norm":
        def embedding_norm(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
            return pooled_embedding(task.model, dict(zip(keys, (x, *others)))).norm(dim=-1, keepdim=True)

        return embedding_norm
    if not task.has_prediction_head:  # the task contract's answer (BrainfmTask.predicts), as brainfm-predict asks
        raise ConfigError(
            f"this {type(task).__name__} checkpoint has no trained prediction head: attribution explains a fine-tuned "
            "head's output. Fix: interpret a supervised (task=supervised), decoding (task=decoding) or fine-tuned R2T "
            "(task=r2t task.mode=fine_tune) checkpoint, or pass output=embedding_norm to attribute the L2 norm of the "
            "pooled embedding instead")
    binary = getattr(task, "kind", "multiclass") == "binary"

    def head(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        z = task.head_output(dict(zip(keys, (x, *others)))).float()
        return torch.cat([-z, z], dim=-1) if binary else z

    return head


@dataclass
class Attribution:
    """Attributions of one batch.

    Attributes:
        attributions: like the explained input (``(B, C, X, Y, Z, T)`` or ``(B, T, n_rois)``), float32, in
            the explained output's units (logit, log-odds, label units) per input element.
        delta: ``(B,)`` ``sum(attributions) - (output - baseline_output)``: IG's quadrature error (captum's
            convergence delta); SmoothGrad: relative to the clean input (see the module docstring).
        target: ``(B,)`` the explained output index of each window.
        output, baseline_output: ``(B,)`` ``f(x)`` and ``f(baseline)`` at ``target``.
        method: ``integrated_gradients`` or ``smoothgrad``.
    """

    attributions: torch.Tensor
    delta: torch.Tensor
    target: torch.Tensor
    output: torch.Tensor
    baseline_output: torch.Tensor
    method: str


def check_options(method: str = "integrated_gradients", n_steps: int = 128, internal_batch_size: int | None = None,
                  nt_samples: int = 10, stdevs: float = 0.15, nt_type: str = "smoothgrad",
                  nt_samples_batch_size: int | None = None) -> None:
    """Raise ConfigError naming the key of the first invalid option."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} must be one of {list(METHODS)} (Integrated Gradients, or SmoothGrad "
                          "over Integrated Gradients). Fix: method=integrated_gradients")
    if not isinstance(n_steps, (int, np.integer)) or isinstance(n_steps, bool) or n_steps < 2:
        raise ConfigError(f"n_steps={n_steps!r} must be an integer >= 2 (Gauss-Legendre points; 64-128 for a "
                          "completeness error under 1 %)")
    for key, value in (("internal_batch_size", internal_batch_size), ("nt_samples_batch_size", nt_samples_batch_size)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{key}={value!r} must be a positive integer or null (all at once)")
    if method == "smoothgrad":
        if not isinstance(nt_samples, (int, np.integer)) or isinstance(nt_samples, bool) or nt_samples < 1:
            raise ConfigError(f"nt_samples={nt_samples!r} must be a positive integer (noisy copies per input)")
        if not isinstance(stdevs, (int, float)) or isinstance(stdevs, bool) or not np.isfinite(stdevs) or stdevs < 0:
            raise ConfigError(f"stdevs={stdevs!r} must be a non-negative number (noise standard deviation in the "
                              "input's units, e.g. 0.15 for z-scored BOLD)")
        if nt_type not in NT_TYPES:
            raise ConfigError(f"nt_type={nt_type!r} must be one of {list(NT_TYPES)}")


def _targets(spec, out: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """``(B,)`` output indices for ``spec``: None/``predicted`` (argmax; regression/embedding norm: 0), an
    index, or a class name."""
    k = out.shape[1]
    if spec is None or spec == "predicted":
        return out.argmax(dim=1) if k > 1 else torch.zeros(len(out), dtype=torch.long, device=out.device)
    if isinstance(spec, str) and spec in names:
        spec = list(names).index(spec)
    if isinstance(spec, str) and spec.lstrip("-").isdigit():
        spec = int(spec)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool) and 0 <= int(spec) < k:
        return torch.full((len(out),), int(spec), dtype=torch.long, device=out.device)
    raise ConfigError(f"target={spec!r} must be predicted, all, an output index in [0, {k}) or one of {list(names)}")


def attribute(task, batch: Mapping[str, Any], method: str = "integrated_gradients", target: Any = "predicted",
              n_steps: int = 128, internal_batch_size: int | None = None, baseline: str | float | torch.Tensor = "zeros",
              nt_samples: int = 10, stdevs: float = 0.15, nt_type: str = "smoothgrad",
              nt_samples_batch_size: int | None = None, output: str = "head",
              names: Sequence[str] | None = None) -> Attribution:
    """Attributions of one batch to the explained output (:func:`scores`) of ``target``.

    Args:
        task: a task in eval mode (its parameters are not changed), on the batch's device.
        batch: a collated batch with the backbone's inputs (``volume`` ``(B, C, X, Y, Z, T)`` or ``bold``
            ``(B, T, n_rois)`` and ``t`` ``(B, T)`` seconds); the first is attributed (in float32).
        method: ``integrated_gradients`` or ``smoothgrad`` (NoiseTunnel over IG).
        target: ``predicted`` (or None: the argmax class; regression and the embedding norm have one
            output), an output index, or a class name of ``names``.
        n_steps: Gauss-Legendre points of IG's path integral.
        internal_batch_size: scaled inputs per forward/backward pass (None: all ``B * n_steps``).
        baseline: ``zeros``, ``background`` (per window: ``batch["background"]`` ``(B,)``, the stored fill
            value of its run), a number, or a tensor like the input.
        nt_samples, stdevs, nt_type, nt_samples_batch_size: SmoothGrad's noisy copies, noise standard
            deviation (input units), aggregation and copies per pass.
        output: ``head`` or ``embedding_norm`` (see :func:`scores`).
        names: output names (class names) for a ``target`` given by name.

    Returns:
        :class:`Attribution`.

    Raises:
        ConfigError: an invalid option (named), a task without head for ``output=head``, ``background``
            without background values in the batch.
        DataError: non-finite attributions.
    """
    from captum.attr import IntegratedGradients, NoiseTunnel

    check_options(method, n_steps, internal_batch_size, nt_samples, stdevs, nt_type, nt_samples_batch_size)
    f = scores(task, output)
    keys = tuple(task.model.input_keys)
    inputs = task.model.inputs(batch)
    x = inputs[0].detach().float()
    others = tuple(t.detach().float() if torch.is_floating_point(t) else t.detach() for t in inputs[1:])
    if isinstance(baseline, torch.Tensor):
        base = baseline.to(x).expand_as(x)
    elif baseline == "zeros" or baseline is None:
        base = torch.zeros_like(x)
    elif baseline == "background":
        if "background" not in batch:
            raise ConfigError("baseline=background needs the stored background value of each window (volume "
                              f"stores); this batch of {keys[0]!r} has none. Fix: baseline=zeros or a number")
        bg = torch.as_tensor(batch["background"]).to(x).reshape(-1, *([1] * (x.dim() - 1)))
        base = bg.expand_as(x).clone()
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        base = torch.full_like(x, float(baseline))
    else:
        raise ConfigError(f"baseline={baseline!r} must be one of {list(BASELINES)} or a number")
    names = list(names) if names is not None else None
    with torch.no_grad():
        out = f(x, *others)
        out_base = f(base, *others)
    tgt = _targets(target, out, names or [str(k) for k in range(out.shape[1])])
    extra = others if others else None
    ig = IntegratedGradients(f, multiply_by_inputs=True)
    with _quiet_captum(), torch.enable_grad():
        if method == "integrated_gradients":
            attr, delta = ig.attribute(x, baselines=base, target=tgt, additional_forward_args=extra, n_steps=int(n_steps),
                                       method="gausslegendre", internal_batch_size=internal_batch_size,
                                       return_convergence_delta=True)
        else:
            nt = NoiseTunnel(ig)
            attr = nt.attribute(x, nt_type=nt_type, nt_samples=int(nt_samples), stdevs=float(stdevs),
                                nt_samples_batch_size=nt_samples_batch_size, baselines=base, target=tgt,
                                additional_forward_args=extra, n_steps=int(n_steps), method="gausslegendre",
                                internal_batch_size=internal_batch_size)
            delta = None
    attr = attr.detach().float()
    if not torch.isfinite(attr).all():
        raise DataError(f"non-finite {method} attributions ({int((~torch.isfinite(attr)).sum())} values): the "
                        "checkpoint or the input has diverged")
    rows = torch.arange(len(tgt), device=out.device)
    fx, fb = out[rows, tgt].detach(), out_base[rows, tgt].detach()
    total = attr.flatten(1).sum(dim=1)
    if delta is None:
        delta = total - (fx - fb)
    return Attribution(attr, delta.detach().float().reshape(-1), tgt, fx.float(), fb.float(), method)


# -- maps in the data's space ----------------------------------------------------------------------------------
def original_grid(store, run: int) -> tuple[np.ndarray, tuple[int, int, int], Any]:
    """``(affine (4, 4), original (X, Y, Z), CropPad)`` of run ``run`` of a volume store: the scan's grid
    before brainfm-preprocess cropped/padded it (``meta.json``'s ``original_shape`` and ``crop_pad``), and
    its voxel-to-world affine. A run without an affine gets the identity (a warning says so)."""
    meta = store.meta(run)
    cp = CropPad.from_axis_order([v for pair in (meta.get("crop_pad") or [[0, 0]] * 3) for v in pair])
    grid = tuple(int(s) for s in meta["shape"])
    original = tuple(int(s) for s in (meta.get("original_shape") or grid)[:3])
    affine = meta.get("affine")
    if affine is None:
        log.warning("%s records no affine: its attribution maps get the identity affine (voxel = mm)",
                    store.describe_run(run))
        model_affine = np.eye(4)
    else:
        model_affine = np.asarray(affine, dtype=np.float64)
    shift = np.eye(4)
    shift[:3, 3] = [b for b, _ in cp.pairs]  # model voxel i is original voxel i - before
    return model_affine @ shift, original, cp


def to_original_grid(volume: np.ndarray, store, run: int) -> tuple[np.ndarray, np.ndarray]:
    """A map on the model's grid ``(X, Y, Z, ...)`` -> ``(map on the run's original grid, its affine)``:
    padding is removed, cropped-away voxels are 0 (they were never seen)."""
    affine, original, cp = original_grid(store, run)
    src, dst = cp.slices(original)
    out = np.zeros((*original, *volume.shape[3:]), dtype=np.float32)
    out[src] = volume[dst]
    return out, affine


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, tr: float | None = None,
                description: str = "") -> Path:
    """Write ``data`` ``(X, Y, Z)`` or ``(X, Y, Z, T)`` float32 as NIfTI-1 (mm; ``tr`` seconds between frames in
    ``pixdim[4]``; ``description`` in the header's 80-byte ``descrip``) atomically."""
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    if data.ndim == 4 and tr:
        img.header.set_zooms((*img.header.get_zooms()[:3], float(tr)))
    with atomic_path(path, keep_suffix=True) as tmp:  # nibabel picks the format (.nii.gz) from the name
        nib.save(img, tmp)
    return path


def write_roi_map(path: str | os.PathLike, attributions: np.ndarray, roi_names: Sequence[str], times: np.ndarray,
                  bold: np.ndarray | None = None, attrs: Mapping[str, Any] | None = None) -> Path:
    """Write a ROI x time map atomically as HDF5: ``attribution`` ``(T, n_rois)`` float32, ``roi_names``
    ``(n_rois,)`` UTF-8, ``time_s`` ``(T,)`` seconds from the window onset, ``bold`` ``(T, n_rois)`` (the
    explained input) and ``attrs`` on the root.

    Raises:
        DataError: ``roi_names`` whose count is not the map's.
    """
    import h5py

    path = Path(path)
    if len(roi_names) != attributions.shape[1]:
        raise DataError(f"{len(roi_names)} ROI names for a map of {attributions.shape[1]} ROIs ({path})")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("attribution", data=np.asarray(attributions, dtype=np.float32))
        f.create_dataset("roi_names", data=[str(n) for n in roi_names], dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("time_s", data=np.asarray(times, dtype=np.float32))
        if bold is not None:
            f.create_dataset("bold", data=np.asarray(bold, dtype=np.float32))
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path


def read_roi_map(path: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray, dict]:
    """``(attribution (T, n_rois), roi_names, time_s (T,), attrs)`` of a :func:`write_roi_map` file."""
    import h5py

    with h5py.File(path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["roi_names"][:]]
        return f["attribution"][:], names, f["time_s"][:], dict(f.attrs)


def plot_roi_map(path: str | os.PathLike, attributions: np.ndarray, roi_names: Sequence[str], times: np.ndarray,
                 title: str = "") -> Path:
    """A PNG heatmap of a ROI x time map (ROIs on the y axis, seconds on the x axis, a diverging colour
    scale symmetric about 0), written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    a = np.asarray(attributions, dtype=np.float32).T  # (n_rois, T)
    lim = float(np.abs(a).max()) or 1.0
    n = a.shape[0]
    fig, ax = plt.subplots(figsize=(8, max(3.0, min(12.0, 0.12 * n + 1.5))))
    try:
        dt = float(times[1] - times[0]) if len(times) > 1 else 1.0
        im = ax.imshow(a, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest",
                       extent=(float(times[0]) - dt / 2, float(times[-1]) + dt / 2, n - 0.5, -0.5))
        step = max(1, n // 40)
        ax.set_yticks(range(0, n, step))
        ax.set_yticklabels([roi_names[i] for i in range(0, n, step)], fontsize=6)
        ax.set_xlabel("time from window onset (s)")
        ax.set_ylabel("ROI")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, label="attribution")
        fig.tight_layout()
        save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
    return path


# -- a whole run: windows of a checkpoint's data -------------------------------------------------------------------
@dataclass
class Options:
    """The settings of :func:`interpret` (``conf/interpret.yaml``; see :func:`attribute`).

    ``split``: the evaluation windows of ``train``, ``val`` or ``test``. ``windows``: grid window indices of that
    split; ``subjects``: every window of these subject ids; neither: the first window of each subject, at
    most ``max_windows``. ``target``: ``predicted``, ``all`` (every class), an index or a class name.
    ``grid``: ``original`` (volume maps on the scan's grid before crop/pad) or ``model``. ``tolerance``: IG
    windows whose ``|delta|`` exceeds this fraction of ``|f(x) - f(baseline)|`` are reported (a warning naming
    the ``n_steps`` to use).
    """

    method: str = "integrated_gradients"
    target: Any = "predicted"
    n_steps: int = 128
    internal_batch_size: int | None = 16
    nt_samples: int = 10
    nt_samples_batch_size: int | None = None
    stdevs: float = 0.15
    nt_type: str = "smoothgrad"
    baseline: Any = "zeros"
    output: str = "head"
    split: str = "val"
    windows: Sequence[int] | None = None
    subjects: Sequence[str] | None = None
    max_windows: int = 8
    batch_size: int = 1
    grid: str = "original"
    seed: int = 0
    tolerance: float = 0.01

    def check(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        check_options(self.method, self.n_steps, self.internal_batch_size, self.nt_samples, self.stdevs,
                      self.nt_type, self.nt_samples_batch_size)
        if self.output not in OUTPUTS:
            raise ConfigError(f"output={self.output!r} must be one of {list(OUTPUTS)}")
        if self.grid not in GRIDS:
            raise ConfigError(f"grid={self.grid!r} must be one of {list(GRIDS)}")
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"split={self.split!r} must be train, val or test")
        if not (isinstance(self.baseline, (int, float)) and not isinstance(self.baseline, bool)) and \
                self.baseline not in BASELINES:
            raise ConfigError(f"baseline={self.baseline!r} must be one of {list(BASELINES)} or a number")
        if not isinstance(self.tolerance, (int, float)) or isinstance(self.tolerance, bool) or self.tolerance <= 0:
            raise ConfigError(f"tolerance={self.tolerance!r} must be a positive fraction (0.01: 1 %)")
        for key in ("max_windows", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if self.windows is not None and self.subjects is not None:
            raise ConfigError("give windows=[...] or subjects=[...], not both")


def device_of(trainer_cfg) -> torch.device:
    """The one device attributions run on, from a ``trainer`` config: ``accelerator`` ``gpu``/``cuda``/
    ``auto`` with CUDA available -> ``cuda`` (device 0, or the first of ``devices`` when a list), else the
    CPU. Attribution runs in this one process (several devices or a ``ddp`` strategy: logged), in float32
    whatever ``trainer.precision`` says (completeness needs it).

    Raises:
        ConfigError: ``accelerator=gpu`` without CUDA.
    """
    cfg = trainer_cfg if trainer_cfg is not None else {}
    acc = str(cfg.get("accelerator", "cpu") or "cpu").lower()
    devices = cfg.get("devices", 1)
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        devices = [int(d) for d in devices]  # a ListConfig of device indices
    strategy = cfg.get("strategy")
    if isinstance(strategy, Mapping):
        strategy = strategy.get("_target_")
    if (isinstance(devices, int) and devices > 1) or devices in ("auto", -1) or (strategy and "ddp" in str(strategy)):
        log.info("brainfm-interpret runs in one process on one device (trainer devices=%s, strategy=%s)",
                 devices, strategy)
    if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        index = int(devices[0]) if isinstance(devices, (list, tuple)) and devices else 0
        return torch.device("cuda", index)
    if acc in ("gpu", "cuda"):
        raise ConfigError("trainer.accelerator=gpu but CUDA is not available here. Fix: trainer=cpu")
    return torch.device("cpu")


def _pick(ds, opts: Options) -> list[int]:
    """Window indices of ``ds`` to explain."""
    n = len(ds)
    if opts.windows is not None:
        idx = [int(i) for i in opts.windows]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ConfigError(f"windows={bad} are not windows of split {opts.split!r} (it has {n}: 0..{n - 1})")
        return idx
    subjects = [ds.store.subject_ids[ds.index.window(i)[0]] for i in range(n)]
    if opts.subjects is not None:
        wanted = [str(s) for s in opts.subjects]
        missing = sorted(set(wanted) - set(subjects))
        if missing:
            raise ConfigError(f"subjects={missing} have no windows in split {opts.split!r} (it has "
                              f"{sorted(set(subjects))[:10]}{' ...' if len(set(subjects)) > 10 else ''})")
        return [i for i in range(n) if subjects[i] in wanted]
    first: dict[str, int] = {}
    for i, s in enumerate(subjects):
        first.setdefault(s, i)
    return sorted(first.values())[: int(opts.max_windows)]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(text))


def interpret(loaded, out_dir: str | os.PathLike, options: Options | None = None, trainer=None,
              categories: Sequence[str] | None = None) -> Any:
    """Attribution maps of the chosen windows of a loaded run (:func:`brainfm.runs.load_run`), one file set
    per window and target, plus one per subject, and an index ``attributions_<method>.csv``.

    Files (``<out_dir>/[<dataset>/]<subject>/``):

    - volume models: ``<run>_w<start>_<target>_4d.nii.gz`` (the attribution over time, ``(X, Y, Z, T)``, TR
      in ``pixdim[4]``), ``..._meanabs.nii.gz`` (the mean absolute attribution over the clip's frames,
      ``(X, Y, Z)``), on the run's original grid with its affine (``grid=original``; ``model``: the
      preprocessed grid); ``subject_<target>_meanabs.nii.gz``: the mean of the subject's ``meanabs`` maps.
      The padding brainfm-preprocess added is not in the original grid: what the model attributed to it
      is the index's ``outside_sum`` (0 with ``baseline=background``: padded voxels hold the background);
    - sequence models: ``<run>_w<start>_<target>.h5`` (:func:`write_roi_map`: ``(T, n_rois)`` with the ROI
      names) and ``.png`` (:func:`plot_roi_map`); ``subject_<target>.h5``: ``roi_importance`` ``(n_rois,)``,
      the mean absolute attribution of each ROI over time and the subject's windows.

    Every file is written to a temporary name and renamed. Returns the index as a pandas DataFrame
    (:data:`INDEX_COLUMNS`).

    Raises:
        ConfigError: invalid options (named), a task without head (``output=head``), windows or subjects not
            in the split, a split without windows. DataError: non-finite attributions.
    """
    import pandas as pd

    opts = options or Options()
    opts.check()
    device = device_of(trainer)
    task = loaded.task.eval().to(device)
    names = output_names(task, opts.output, categories)
    if opts.target == "all":
        target_specs: list[Any] = list(range(len(names)))
    else:
        target_specs = [opts.target]
    if opts.output == "head" and not task.has_prediction_head:
        scores(task, "head")  # raises the explanation
    out_dir = Path(out_dir)
    children = [(n, dm) for n, dm in datamodules_of(loaded.datamodule) if has_split(dm, opts.split)]
    if not children:
        raise ConfigError(f"split={opts.split!r} has no windows in {getattr(loaded.datamodule, 'path', 'the data')}"
                          " (a time split has only train and val). Fix: split=val")
    rows: list[dict] = []
    torch.manual_seed(int(opts.seed))  # SmoothGrad's noise
    for name, dm in children:
        ds = window_dataset(dm, opts.split)
        store = ds.store
        volume = task.model.input_keys[0] == "volume"  # clips (B, C, X, Y, Z, T); else windows (B, T, n_rois)
        base_dir = out_dir / _safe(name) if len(children) > 1 else out_dir
        if opts.baseline == "background" and not volume:
            raise ConfigError("baseline=background is the stored background of volume runs; sequence windows "
                              "have none. Fix: baseline=zeros (the mean of z-scored series) or a number")
        picked = _pick(ds, opts)
        if not picked:
            continue
        roi_names = None if volume else _roi_names(store, ds)
        subject_maps: dict[tuple[str, str], list] = {}
        for lo in range(0, len(picked), int(opts.batch_size)):
            chunk = picked[lo:lo + int(opts.batch_size)]
            batch = collate_windows([ds[i] for i in chunk])
            if volume and opts.baseline == "background":
                batch["background"] = torch.tensor([_background(store, int(r)) for r in batch["run"]])
            batch = _to(batch, device)
            for spec in target_specs:
                res = attribute(task, batch, method=opts.method, target=spec, n_steps=int(opts.n_steps),
                                internal_batch_size=opts.internal_batch_size, baseline=opts.baseline,
                                nt_samples=int(opts.nt_samples), stdevs=float(opts.stdevs), nt_type=opts.nt_type,
                                nt_samples_batch_size=opts.nt_samples_batch_size, output=opts.output, names=names)
                attr = res.attributions.cpu().numpy()
                for b, i in enumerate(chunk):
                    run, start = ds.index.window(i)
                    subject, run_id = str(store.subject_ids[run]), str(store.run_ids[run])
                    tr = float(store.trs[run]) if np.isfinite(store.trs[run]) else float(getattr(ds, "tr", 0.0) or 0.0)
                    k = int(res.target[b])
                    tname = names[k] if k < len(names) else str(k)
                    stem = base_dir / _safe(subject) / f"{_safe(run_id)}_w{start:05d}_{opts.method}_{_safe(tname)}"
                    diff = float(res.output[b] - res.baseline_output[b])
                    info = {"checkpoint": str(loaded.ckpt.get("_path", "")), "method": opts.method,
                            "target": k, "target_name": tname, "subject_id": subject, "run_id": run_id,
                            "window_start_tr": int(start), "window_start_s": float(start * tr), "tr": tr,
                            "output": float(res.output[b]), "baseline_output": float(res.baseline_output[b]),
                            "delta": float(res.delta[b]), "n_steps": int(opts.n_steps),
                            "baseline": str(opts.baseline)}
                    if volume:
                        files = _write_volume(stem, attr[b], store, run, tr * getattr(ds, "stride", 1), opts.grid,
                                              f"{opts.method} {tname} f(x)={info['output']:.4g} "
                                              f"f(base)={info['baseline_output']:.4g}")
                        subject_maps.setdefault((subject, tname), []).append((files[1], run))
                        file, outside = files[0], files[2]
                    else:
                        times = batch["t"][b].cpu().numpy() if "t" in batch else np.arange(attr.shape[1]) * tr
                        file = write_roi_map(stem.with_suffix(".h5"), attr[b], roi_names, times,
                                             bold=batch[task.model.input_keys[0]][b].float().cpu().numpy(), attrs=info)
                        plot_roi_map(stem.with_suffix(".png"), attr[b], roi_names, times,
                                     title=f"{opts.method} of {tname}: subject {subject} {run_id}, window from TR {start} "
                                           f"({start * tr:.0f} s)")
                        subject_maps.setdefault((subject, tname), []).append(np.abs(attr[b]).mean(axis=0))
                        outside = 0.0
                    rows.append({"dataset": name, "split": opts.split, "window": int(i), "subject_id": subject,
                                 "run": int(run), "run_id": run_id, "window_start_tr": int(start),
                                 "window_start_s": float(start * tr), "tr": tr, "method": opts.method, "target": k,
                                 "target_name": tname, "output": info["output"],
                                 "baseline_output": info["baseline_output"], "attribution_sum": float(attr[b].sum(dtype=np.float64)),
                                 "delta": info["delta"],
                                 "relative_delta": abs(info["delta"]) / abs(diff) if diff else float("nan"),
                                 "outside_sum": outside, "file": str(file)})
        for (subject, tname), maps in subject_maps.items():
            folder = base_dir / _safe(subject)
            if volume:
                _write_subject_volume(folder / f"subject_{opts.method}_{_safe(tname)}_meanabs.nii.gz", maps)
            else:
                _write_subject_rois(folder / f"subject_{opts.method}_{_safe(tname)}.h5", maps, roi_names)
    if not rows:
        raise ConfigError(f"no window of split {opts.split!r} to explain")
    frame = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    if opts.method == "integrated_gradients":
        off = frame["relative_delta"] > float(opts.tolerance)
        if off.any():
            # a model whose first layer normalizes (Linear -> LayerNorm) changes fastest right next to a zero
            # baseline, where a few quadrature points miss it
            log.warning("Integrated Gradients of %d of %d window(s) x target(s) miss completeness by more than %.1f%% "
                        "(worst: |delta| = %.1f%% of |f(x) - f(baseline)|, see %s): the path integral needs more "
                        "points. Fix: n_steps=%d", int(off.sum()), len(frame), 100 * float(opts.tolerance),
                        100 * float(frame["relative_delta"].max()), out_dir / f"attributions_{opts.method}.csv",
                        2 * int(opts.n_steps))
    write_csv(out_dir / f"attributions_{opts.method}.csv", frame)
    return frame


def _background(store, run: int) -> float:
    """The stored background (fill) value of a volume run; ConfigError for stores that record none."""
    try:
        return float(store.run_stats(run)["fill_value"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{store.describe_run(run)} records no background value (SwiFT frame folders); "
                          "baseline=background needs a brainfm volume store. Fix: baseline=zeros or a number, e.g. "
                          "the background intensity of the frames") from exc


def _roi_names(store, ds) -> list[str]:
    names = getattr(store, "roi_names", None)
    n = int(getattr(store, "n_rois", 0) or (len(names) if names else 0))
    if isinstance(names, Mapping):
        names = [str(v) for vs in names.values() for v in vs]
    if not names or (n and len(names) != n):
        sample = ds[0]
        n = int(sample["bold"].shape[-1]) if "bold" in sample else n
        return [f"roi{i}" for i in range(n)]
    return [str(v) for v in names]


def _write_volume(stem: Path, attr: np.ndarray, store, run: int, frame_tr: float, grid: str, description: str = ""
                  ) -> tuple[Path, Path, float]:
    """The 4-D map (channels summed: completeness holds for the sum) and the mean-abs 3-D map of one window,
    and the attribution left out of them (in the padding that ``grid=original`` removes)."""
    vol = attr.sum(axis=0)  # (C, X, Y, Z, T) -> (X, Y, Z, T)
    total = float(vol.sum(dtype=np.float64))
    if not callable(getattr(store, "meta", None)):  # SwiFT frame folders: no grid record
        affine = np.eye(4)
    elif grid == "original":
        vol, affine = to_original_grid(vol, store, run)
    else:
        recorded = store.meta(run).get("affine")
        affine = np.eye(4) if recorded is None else np.asarray(recorded, dtype=np.float64)
    four = write_nifti(stem.with_name(stem.name + "_4d.nii.gz"), vol, affine, tr=frame_tr, description=description)
    three = write_nifti(stem.with_name(stem.name + "_meanabs.nii.gz"), np.abs(vol).mean(axis=3), affine,
                        description=f"mean |{description}|"[:79])
    return four, three, total - float(vol.sum(dtype=np.float64))


def _write_subject_volume(path: Path, maps: list) -> None:
    import nibabel as nib

    first = nib.load(maps[0][0])
    acc = np.zeros(first.shape, dtype=np.float64)
    for file, _ in maps:
        img = nib.load(file)
        if img.shape != first.shape:
            log.warning("%s: windows on different grids; the subject map averages those on %s", path, first.shape)
            continue
        acc += np.asarray(img.dataobj, dtype=np.float64)
    write_nifti(path, (acc / len(maps)).astype(np.float32), first.affine)


def _write_subject_rois(path: Path, maps: list, roi_names: Sequence[str]) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("roi_importance", data=np.mean(np.stack(maps), axis=0).astype(np.float32))
        f.create_dataset("roi_names", data=[str(n) for n in roi_names], dtype=h5py.string_dtype("utf-8"))
        f.attrs["n_windows"] = len(maps)


def interpret_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                         options: Options | None = None, data_overrides: Mapping[str, Any] | Sequence[str] | None = None,
                         trainer=None) -> tuple[Path, Any]:
    """``brainfm-interpret``: load a checkpoint and its data (:func:`brainfm.runs.load_run`), check the
    options first (before any data are read), and write the maps (:func:`interpret`) to ``out_dir``
    (default ``<run_dir>/interpret/<method>``). Returns ``(out_dir, index frame)``.

    Raises as :func:`brainfm.runs.load_run` and :func:`interpret`.
    """
    opts = options or Options()
    opts.check()
    loaded = load_run(ckpt, data_overrides)
    if opts.output == "head" and not loaded.task.has_prediction_head:
        scores(loaded.task, "head")  # the explanation, before any window is read
    out = Path(out_dir) if out_dir else loaded.run_dir / "interpret" / opts.method
    targets = getattr(loaded.task, "targets", None)  # R2T: a list (a class label is its only one)
    target = targets[0] if targets else getattr(loaded.task, "target", None)
    categories = loaded.label_categories(target) if isinstance(target, str) else None
    frame = interpret(loaded, out, opts, trainer=trainer, categories=categories)
    return out, frame
