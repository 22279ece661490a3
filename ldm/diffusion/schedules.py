"""Discrete noise schedules: betas, ᾱ_t, the closed-form forward process and the σ table.

`NoiseSchedule` holds everything derived from the betas of a T-step DDPM (Ho et al. 2020):
``alphas_cumprod`` (ᾱ_t, float32, bit-identical to diffusers' `DDPMScheduler`), the
closed-form q(x_t | x_0), the signal-to-noise ratio, and the k-diffusion noise levels
σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) with the maps t ↔ σ that the samplers and the denoiser use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SCHEDULES = ("linear", "scaled_linear", "cosine")

# diffusers' Euler/DPM schedulers replace ᾱ_T = 0 (zero terminal SNR) by 2^-24 so that σ_T is
# finite (≈ 4096); sampling starts there. Training (`add_noise`) keeps the exact ᾱ_T = 0.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def make_betas(
    schedule: str, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Beta schedule β_1..β_T as float32, computed exactly as diffusers does.

    Args:
        schedule: ``linear`` (Ho et al. 2020 §4: β linear in t), ``scaled_linear`` (Stable
            Diffusion's "linear": sqrt(β) linear in t) or ``cosine`` (Nichol & Dhariwal 2021).
        num_timesteps: T.
        beta_start: β_1 (linear schedules only).
        beta_end: β_T (linear schedules only).

    Returns:
        (T,) float32 betas.
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2
        )
    if schedule == "cosine":
        # Nichol & Dhariwal 2021, eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2),
        # s = 0.008; β_t = 1 − ᾱ_t/ᾱ_{t−1}, clipped to ≤ 0.999 (§3.2). Computed in float64 like
        # diffusers' `betas_for_alpha_bar`.
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the last step has zero SNR (ᾱ_T = 0).

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift sqrt(ᾱ_t) so its last value is 0 and scale it so its first value is unchanged.

    Args:
        betas: (T,) float32 betas.

    Returns:
        (T,) float32 rescaled betas (β_T = 1).
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo cumprod
    return 1 - alphas


def _view(coef: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) coefficient to broadcast against ``like`` (B, ...)."""
    return coef.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


class NoiseSchedule(nn.Module):
    """A T-step variance-preserving noise schedule and its k-diffusion σ view.

    Buffers are non-persistent (they are derived from the constructor arguments) and follow the
    module across devices.

    Attributes:
        betas: (T,) β_t.
        alphas_cumprod: (T,) ᾱ_t = Π_{s≤t} (1 − β_s), identical to diffusers'.
        sigmas: (T,) σ_t = sqrt((1 − ᾱ_t)/ᾱ_t); with zero terminal SNR the last ᾱ is taken as
            2^-24 so that σ_T stays finite (diffusers' Euler/DPM convention).
        log_sigmas: (T,) log σ_t (increasing in t).

    Args:
        schedule: ``linear``, ``scaled_linear`` or ``cosine`` (see `make_betas`).
        num_timesteps: number of training timesteps T.
        beta_start: first beta (linear schedules).
        beta_end: last beta (linear schedules).
        zero_terminal_snr: rescale the betas to zero terminal SNR (Lin et al. 2024, Alg. 1).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    sigmas: Tensor
    log_sigmas: Tensor

    def __init__(
        self,
        schedule: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        finite = alphas_cumprod.clone()
        if zero_terminal_snr:
            finite[-1] = ZERO_SNR_ALPHA_CUMPROD
        sigmas = (
            (1 - finite) / finite
        ) ** 0.5  # Karras et al. 2022, Table 1 (VP): σ = sqrt(1/ᾱ − 1)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule!r}, num_timesteps={self.num_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr}"
        )

    @property
    def sigma_min(self) -> float:
        """σ at t = 0."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """σ at t = T − 1 (finite even with zero terminal SNR)."""
        return float(self.sigmas[-1])

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Variance-preserving coefficients (α_t, σ_t) = (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)).

        Args:
            t: (B,) integer timesteps in [0, T − 1].

        Returns:
            Two (B,) float32 tensors.
        """
        abar = self.alphas_cumprod[t.long()]
        return abar**0.5, (1 - abar) ** 0.5

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021, eq. 2).

        Args:
            t: (B,) integer timesteps.

        Returns:
            (B,) float32; 0 at the last step with zero terminal SNR.
        """
        abar = self.alphas_cumprod[t.long()]
        return abar / (1 - abar)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x_0) in closed form (Ho et al. 2020, eq. 4).

        x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε.

        Args:
            x0: (B, ...) clean samples.
            noise: (B, ...) ε.
            t: (B,) integer timesteps.

        Returns:
            (B, ...) x_t in the dtype of ``x0``.
        """
        alpha, sigma = self.alpha_sigma(t.to(self.alphas_cumprod.device))
        alpha, sigma = alpha.to(x0.device), sigma.to(x0.device)
        x_t = _view(alpha, x0) * x0.float() + _view(sigma, x0) * noise.float()
        return x_t.to(x0.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at (possibly fractional) timesteps, interpolated linearly in σ.

        This is diffusers' ``np.interp(t, arange(T), sigmas)`` (Euler/Heun/DPM `set_timesteps`),
        evaluated in float64 on the CPU so that sigma grids match diffusers bit for bit.

        Args:
            t: timesteps in [0, T − 1], any shape.

        Returns:
            float64 CPU tensor of the same shape.
        """
        table = self.sigmas.detach().cpu().double()
        t = t.detach().cpu().double().clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        frac = t - low
        return table[low] + (table[low + 1] - table[low]) * frac

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Timestep for a noise level: linear interpolation in log σ (k-diffusion, diffusers).

        Args:
            sigma: noise levels, any shape.
            quantize: round to the nearest training timestep (nearest in log σ), as
                k-diffusion's ``quantize=True`` and diffusers' DPM-Solver with Karras sigmas.

        Returns:
            float32 timesteps in [0, T − 1] on the device of ``sigma``.
        """
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().clamp(min=1e-10).log().reshape(-1)  # (N,)
        # index of the last table entry ≤ log σ, clipped so that [low, low + 1] is a valid pair
        low = torch.searchsorted(log_sigmas, log_sigma, right=True) - 1
        low = low.clamp(0, self.num_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        if quantize:
            t = t.round()
        return t.reshape(sigma.shape)
