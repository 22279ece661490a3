"""The conditional flow-matching training loss (rectified flow, Esser et al. 2024 §2-3).

See `ldm.diffusion.flow` for the process x_t = (1 − t)·x0 + t·ε and its σ-space view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.flow import FLOW_TIMESTEP_SAMPLING, FlowSchedule, sample_flow_t, shift_t
from ldm.diffusion.losses import LossOutput
from ldm.diffusion.noise import offset_noise as make_noise

MODE_SCALE_MAX = 2 / (math.pi - 2)  # Esser et al. 2024, eq. 20: f_mode is monotone for s ≤ this


class FlowLoss:
    """The conditional flow-matching loss ‖v̂(x_t, t) − (ε − x0)‖² (Lipman et al. 2023, eq. 23).

    t is drawn by `sample_flow_t` and shifted by the schedule's α (Esser et al. 2024, §3.1 and
    eq. 23); the non-uniform densities are the timestep weightings of Esser et al. Table 1
    (rf/lognorm, rf/mode, rf/cosmap), applied by sampling rather than by weights. Callable as
    `DiffusionLoss` is.

    Args:
        timestep_sampling: ``uniform``, ``logit_normal``, ``mode`` or ``cosmap``.
        logit_mean: m of ``logit_normal``.
        logit_std: s of ``logit_normal``.
        mode_scale: s of ``mode``, in [−1, 2/(π − 2)] (where f_mode is a bijection of [0, 1]).
        offset_noise: offset-noise strength (0 disables).
    """

    def __init__(
        self,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        offset_noise: float = 0.0,
    ) -> None:
        if timestep_sampling not in FLOW_TIMESTEP_SAMPLING:
            raise ValueError(
                f"unknown flow timestep sampling {timestep_sampling!r}; valid: "
                f"{', '.join(FLOW_TIMESTEP_SAMPLING)}"
            )
        if logit_std <= 0:
            raise ValueError(f"flow_logit_std must be > 0, got {logit_std}")
        if not -1 <= mode_scale <= MODE_SCALE_MAX:
            raise ValueError(
                f"flow_mode_scale must be in [-1, {MODE_SCALE_MAX:.4f}] (2/(pi - 2): "
                f"beyond, f_mode is not monotone), got {mode_scale}"
            )
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.offset_noise = offset_noise

    def __call__(
        self,
        net: Callable[..., Tensor],
        x0: Tensor,
        schedule: FlowSchedule,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> LossOutput:
        """Per-sample loss; ``LossOutput.t`` holds the integer bucket ⌊T·t⌋ for logging.

        Args:
            net: ``net(x_t, timestep, **cond)`` with float32 (B,) timesteps T·t.
            x0: (B, C, H, W) clean latents.
            schedule: the `FlowSchedule`.
            cond: conditioning keyword arguments for the network.
            generator: source of t and ε (t drawn first).
            t: optional fixed (B,) times in [0, 1] (no draw, no shift).
            noise: optional fixed ε.
        """
        if t is None:
            t = sample_flow_t(
                x0.shape[0],
                self.timestep_sampling,
                generator,
                x0.device,
                self.logit_mean,
                self.logit_std,
                self.mode_scale,
            )
            t = shift_t(t, schedule.shift_for(tuple(x0.shape[-2:])))
        t = t.to(x0.device).float()
        if noise is None:
            noise = make_noise(x0, self.offset_noise, generator)
        tv = t.reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - tv) * x0.float() + tv * noise.float()  # Esser et al. 2024, eq. 1 (RF)
        target = noise.float() - x0.float()  # dx_t/dt
        out = net(x_t.to(x0.dtype), t * schedule.num_timesteps, **(cond or {}))
        mse = (out.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
        bucket = (t * schedule.num_timesteps).long().clamp(0, schedule.num_timesteps - 1)
        return LossOutput(loss=mse, t=bucket)


__all__ = ["FlowLoss"]
