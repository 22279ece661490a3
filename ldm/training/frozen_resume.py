"""Resume checkpoints without the frozen weights: the part of `DiffusionModule` that saves and
restores ``resume.ckpt``.

``resume.ckpt`` leaves out the frozen autoencoder and text encoder (:data:`FROZEN_PREFIXES`),
and the U-Net's frozen parameters (LoRA base, ``model.freeze``) when ``model.init_from`` restores
them: the run's config rebuilds them from their own files, and for a small U-Net (or a LoRA run)
they are most of the file. A fingerprint of each (parameter count, sum and sum of squares,
taken when the module is built) is stored instead, and a resume whose frozen weights differ
fails with a one-line error. A text encoder that trains (`ldm.text_tuning`) keeps its trainable
weights in ``resume.ckpt`` (and exports them as ``text_encoder.*``); only its frozen rest is
left out.

The host module provides ``model`` (a ``LatentDiffusion``), ``ema`` (or None),
``_text_trainable`` and ``_frozen_unet`` (names of trainable text-encoder and frozen U-Net
parameters) and ``frozen_fingerprint`` (:meth:`FrozenResume._fingerprint_frozen` at build time).
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: State-dict prefixes of the frozen parts that resume checkpoints leave out (see _frozen_states).
FROZEN_PREFIXES: tuple[str, ...] = ("model.autoencoder.", "model.text_encoder.")
#: Relative tolerance of the frozen-weight fingerprint (sums in float64; device-independent).
_FINGERPRINT_RTOL = 1e-6


class FrozenResume:
    """Lightning checkpoint hooks that leave the frozen parts out and check them back in."""

    def _frozen_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Prefix -> state of each frozen part, read from the parts themselves: they are never
        sharded, so this is local (``self.state_dict()`` would gather the U-Net under FSDP)."""
        parts = (self.model.autoencoder, self.model.text_encoder)
        states = {
            prefix: part.state_dict() for prefix, part in zip(FROZEN_PREFIXES, parts, strict=True)
        }
        text = states["model.text_encoder."]
        for name in self._text_trainable:
            del text[name]
        if self._frozen_unet:
            params = dict(self.model.unet.named_parameters())
            states["model.unet."] = {name: params[name] for name in self._frozen_unet}
        return states

    def _fingerprint_frozen(self) -> dict[str, list[float]]:
        """Per frozen prefix: ``[count, sum, sum of squares]`` of its float state (float64)."""
        out: dict[str, list[float]] = {}
        for prefix, state in self._frozen_states().items():
            entry = out.setdefault(prefix, [0.0, 0.0, 0.0])
            for tensor in state.values():
                if tensor.is_floating_point():
                    values = tensor.detach().double()
                    entry[0] += values.numel()
                    entry[1] += float(values.sum())
                    entry[2] += float(values.square().sum())
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen autoencoder and text encoder out of ``resume.ckpt``."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            return
        frozen_unet = {
            f"{where}{name}"
            for name in self._frozen_unet
            for where in ("model.unet.", "ema.model.")
        }
        trained_text = {"model.text_encoder." + name for name in self._text_trainable}
        omitted = [
            name
            for name in state
            if (name.startswith(FROZEN_PREFIXES) and name not in trained_text)
            or name in frozen_unet
        ]
        if not omitted:  # e.g. non-zero ranks under FSDP, which save nothing
            return
        for name in omitted:
            del state[name]
        checkpoint["frozen_omitted"] = {"fingerprint": self.frozen_fingerprint}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put this run's frozen weights back, after checking they are the ones it trained with.

        Raises:
            ValueError: The autoencoder or text encoder differs from the checkpoint's.
        """
        info = checkpoint.get("frozen_omitted")
        if info is None:  # a checkpoint that carries every weight
            return
        for prefix, saved in info["fingerprint"].items():
            current = self.frozen_fingerprint.get(prefix, [0.0, 0.0, 0.0])
            same = current[0] == saved[0] and all(
                math.isclose(a, b, rel_tol=_FINGERPRINT_RTOL, abs_tol=1e-12)
                for a, b in zip(current[1:], saved[1:], strict=True)
            )
            if not same:
                what = prefix.removeprefix("model.").rstrip(".")
                key = {
                    "autoencoder": "model.autoencoder_ckpt (the run's step-*.safetensors "
                    "hold it too)",
                    "unet": "model.init_from (the frozen U-Net weights)",
                }.get(what, "model.text_encoder")
                how = (
                    "same size, other values"
                    if current[0] == saved[0]
                    else f"{int(current[0])} values, the run's had {int(saved[0])}"
                )
                raise ValueError(
                    f"the frozen {what} differs from the one this run was trained with ({how}): "
                    f"resume with the run's own {key}"
                )
        state = checkpoint["state_dict"]
        for prefix, part_state in self._frozen_states().items():
            for name, tensor in part_state.items():
                state.setdefault(prefix + name, tensor)
                if prefix == "model.unet." and self.ema is not None:
                    state.setdefault("ema.model." + name, tensor)  # the average of a constant
