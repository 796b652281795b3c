"""Augmentations of ROI windows in time and space, applied by the objectives to training views
(never at evaluation), drawn from the global torch generator so that a resumed run repeats them
(:class:`~brainfm.tasks.base.BrainfmTask` seeds it per step).

- :func:`roi_dropout`: every ROI of a view is set to 0 (its z-scored mean) with probability ``p``,
  independently per view: its correlations become 0 (SimCLR-style feature masking; the ROI masking
  of Network-BERT, Thomas et al. 2022, without the prediction).
- :func:`tr_jitter`: the view is resampled in time by a factor drawn in ``[1 - j, 1 + j]`` per batch
  (linear interpolation), and its times in seconds follow: the same signal as if sampled at another
  TR, for models that embed time in seconds (Thomas et al. 2022's TR embedding) and second-order
  readouts, which should not depend on the sampling rate.
- :func:`gaussian_noise`: additive white noise on the z-scored BOLD.
- :func:`tube_mask`: the ROIs hidden for the whole window (a tube over time): the masking of
  Network-BERT (Thomas et al. 2022, ratio 0.1) and, at high ratios (0.75-0.9), of the video MAEs
  that CortexMAE and BrainLM follow.
"""

from __future__ import annotations

import torch


def roi_dropout(bold: torch.Tensor, p: float) -> torch.Tensor:
    """``bold`` ``(B, T, R)`` with each ``(sample, ROI)`` zeroed with probability ``p``."""
    if p <= 0:
        return bold
    keep = torch.rand(bold.shape[0], 1, bold.shape[2], device=bold.device) >= p
    return bold * keep.to(bold.dtype)


def gaussian_noise(bold: torch.Tensor, std: float) -> torch.Tensor:
    """``bold + N(0, std^2)`` (``std`` in units of the z-scored signal)."""
    return bold + std * torch.randn_like(bold) if std > 0 else bold


def tr_jitter(bold: torch.Tensor, t: torch.Tensor | None, jitter: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample a batch of windows in time by one factor ``s ~ U[1 - jitter, 1 + jitter]``.

    Args:
        bold: ``(B, T, R)`` windows sampled every TR.
        t: ``(B, T)`` times in seconds from each window's onset (or None).
        jitter: the largest relative change of the sampling interval (0: off; < 1).

    Returns:
        ``(bold', t')``: ``(B, T', R)`` with ``T' = floor((T - 1) / s) + 1`` samples at positions
        ``k s`` (in TRs; linear interpolation between the TRs around them), and ``t'`` = ``t`` at those
        positions (``k s TR``), so the window covers the same time and the model sees a TR of ``s TR``.

    Raises:
        ValueError: ``jitter`` outside [0, 1).
    """
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"tr_jitter={jitter} must lie in [0, 1)")
    if jitter == 0 or bold.shape[1] < 2:
        return bold, t
    n = bold.shape[1]
    s = 1.0 + (2.0 * float(torch.rand(())) - 1.0) * jitter
    n_out = int((n - 1) / s) + 1
    pos = torch.arange(n_out, device=bold.device, dtype=torch.float32) * s
    lo = pos.floor().long().clamp_max(n - 1)
    hi = (lo + 1).clamp_max(n - 1)
    w = (pos - lo.float()).to(bold.dtype)[None, :, None]
    out = bold[:, lo] * (1 - w) + bold[:, hi] * w
    if t is None:
        return out, None
    tw = w[..., 0].to(t.dtype)
    return out, t[:, lo] * (1 - tw) + t[:, hi] * tw


def tube_mask(shape: tuple[int, int], ratio: float, device: torch.device) -> torch.Tensor:
    """Boolean ``(B, R)``: ``round(ratio * R)`` (at least one) ROIs per window, hidden at every TR."""
    b, r = shape
    k = min(r - 1, max(1, int(round(ratio * r))))
    ranks = torch.rand(b, r, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < k
