"""Parameterisations (ε, v, x0) and the one wrapper that turns a network into a σ-denoiser.

A network trained on the DDPM forward process x_t = α_t·x_0 + σ_t·ε (α_t = sqrt(ᾱ_t),
σ_t = sqrt(1 − ᾱ_t), variance preserving) predicts one of

* ``eps``: ε (Ho et al. 2020),
* ``v``: v = α_t·ε − σ_t·x_0 (Salimans & Ho 2022, §4),
* ``x0``: x_0 itself.

`prediction_target` gives the training target and `output_to_x0_eps` inverts any of them, so
the network never knows the convention. `Denoiser` exposes the network as a k-diffusion /
EDM denoiser D(x, σ) ≈ E[x_0 | x] on σ-space inputs x = x_0 + σ·ε (Karras et al. 2022, Table 1
"VP" preconditioning): x_t = x / sqrt(1 + σ²), t = t(σ).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.flow import flow_predict, is_flow
from ldm.diffusion.schedules import NoiseSchedule

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    """Validate a parameterisation name (one-line ValueError listing the valid ones)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    return prediction


def prediction_target(
    prediction: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """What the network should output for x_t = α·x0 + σ·ε.

    Args:
        prediction: ``eps``, ``v`` or ``x0``.
        x0: (B, ...) clean samples.
        noise: (B, ...) ε.
        alpha: α_t, broadcastable to ``x0`` (e.g. (B, 1, 1, 1)).
        sigma: σ_t (variance-preserving), broadcastable to ``x0``.

    Returns:
        (B, ...) target.
    """
    if prediction == "eps":
        return noise
    if prediction == "v":
        return alpha * noise - sigma * x0  # Salimans & Ho 2022, §4: v ≡ α_t·ε − σ_t·x
    if prediction == "x0":
        return x0
    check_prediction(prediction)
    raise AssertionError  # unreachable


def output_to_x0_eps(
    prediction: str, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """Recover (x̂0, ε̂) from a network output on x_t = α·x0 + σ·ε.

    Args:
        prediction: ``eps``, ``v`` or ``x0``.
        output: (B, ...) network output.
        x_t: (B, ...) the network input.
        alpha: α_t, broadcastable.
        sigma: σ_t (variance-preserving), broadcastable.

    Returns:
        (x̂0, ε̂), each (B, ...).
    """
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output  # Ho et al. 2020, eq. 15
    if prediction == "v":
        # Salimans & Ho 2022, §4 / App. D: x̂ = α_t·z_t − σ_t·v̂, ε̂ = σ_t·z_t + α_t·v̂ (α² + σ² = 1)
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    check_prediction(prediction)
    raise AssertionError  # unreachable


class Denoiser:
    """The network as a σ-space denoiser D(x, σ, **cond) → x̂0 (k-diffusion's ``Denoiser``).

    The network is called as ``net(x_t, t, **cond)`` with the DDPM-space input
    x_t = x / sqrt(1 + σ²) and the float32 timestep t = ``schedule.sigma_to_t(σ)`` of shape (B,).
    Its output is read according to ``prediction`` and converted to x̂0 in σ-space units
    (identical to DDPM space: x_0 is the same in both). This is a plain callable, not an
    ``nn.Module``, so wrapping a network does not register it twice.

    Args:
        net: the network, ``net(x_t, t, **cond) -> Tensor`` (e.g. the U-Net).
        schedule: the noise schedule the network was trained with.
        prediction: ``eps``, ``v`` or ``x0``.
        quantize_timesteps: round t to the nearest training timestep (k-diffusion's
            ``quantize``; diffusers' DPM-Solver with Karras sigmas does this).
        timesteps: optional ``(sigmas, ts)``: at a σ equal to ``sigmas[i]`` the network gets
            ``ts[i]`` instead of t(σ) (the grid's own timesteps, as diffusers' schedulers feed
            them; see `with_timesteps`).

    At σ = ∞ (zero terminal SNR, ᾱ_T = 0) ``x`` is taken to be x_T itself. With a
    `ldm.diffusion.flow.FlowSchedule` the network predicts the flow velocity and ``prediction``
    is not used (`ldm.diffusion.flow.flow_predict`).
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction: str = "eps",
        quantize_timesteps: bool = False,
        timesteps: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.net = net
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        self.quantize_timesteps = quantize_timesteps
        self.timesteps = timesteps

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> Denoiser:
        """The same denoiser, feeding ``timesteps[i]`` to the network at σ = ``sigmas[i]``."""
        return Denoiser(
            self.net,
            self.schedule,
            self.prediction,
            self.quantize_timesteps,
            (sigmas.float(), timesteps.float()),
        )

    def timestep(self, sigma: Tensor) -> Tensor:
        """The (B,) float32 network timestep for a (B,) σ."""
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize_timesteps)
        if self.timesteps is None:
            return t
        table, ts = (v.to(sigma.device) for v in self.timesteps)
        hit = sigma[:, None] == table[None, :]  # (B, N)
        return torch.where(hit.any(1), ts[hit.float().argmax(1)], t)

    def predict(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> tuple[Tensor, Tensor]:
        """Run the network once and return (x̂0, ε̂).

        Args:
            x: (B, ...) σ-space sample x = x0 + σ·ε.
            sigma: (B,) or scalar noise level(s), > 0.
            **cond: conditioning passed to the network (e.g. ``context=...``).

        Returns:
            (x̂0, ε̂), each (B, ...) in the dtype of ``x``.
        """
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.float()  # (B,)
        if is_flow(self.schedule):  # a velocity network (ldm.diffusion.flow)
            return flow_predict(self.net, x, sigma, self.timestep(sigma), **cond)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        # Karras et al. 2022, Table 1 (VP): c_in = 1/sqrt(σ² + 1) maps σ-space to DDPM space,
        # where α_t = 1/sqrt(1 + σ²) and σ_t^VP = σ/sqrt(1 + σ²).
        alpha = 1 / (s**2 + 1) ** 0.5
        x_t = x.float() * alpha
        sigma_vp = s * alpha
        if torch.isinf(s).any():  # ᾱ = 0: x is x_T, α_t = 0, σ_t = 1
            x_t = torch.where(torch.isinf(s), x.float(), x_t)
            sigma_vp = torch.where(torch.isinf(s), torch.ones_like(s), sigma_vp)
        t = self.timestep(sigma)  # (B,)
        out = self.net(x_t.to(x.dtype), t, **cond).float()
        x0, eps = output_to_x0_eps(self.prediction, out, x_t, alpha, sigma_vp)
        return x0.to(x.dtype), eps.to(x.dtype)

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        """D(x, σ): the network's estimate of x0 (see `predict`)."""
        return self.predict(x, sigma, **cond)[0]
