"""Our checkpoint format: one safetensors file holding tensors plus the resolved run config.

Layout of a file written by :func:`save_checkpoint`:

- tensors, named ``<module>.<parameter>`` (``autoencoder.encoder.conv_in.weight``,
  ``unet.input_blocks.0.0.weight``, ``unet_ema.…``);
- metadata (safetensors' string header): ``format`` = ``ldm``, ``version``, ``kind``
  (``autoencoder`` or ``ldm``), ``config`` (the resolved config as YAML), and free-form extras
  such as ``step``.

Files are written atomically (temporary file in the same directory, fsync, rename, fsync of the
directory), so a process killed mid-write never leaves a truncated checkpoint under the final
name. Nothing is ever unpickled: safetensors holds only tensors and strings.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "ldm"
VERSION = "1"
KINDS = ("autoencoder", "ldm")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a one-line reason."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors by name, the run config and the metadata strings."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    kind: str
    metadata: dict[str, str] = field(default_factory=dict)

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix.`` with the prefix removed."""
        return sub_state_dict(self.tensors, prefix)


def sub_state_dict(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Select the entries under ``prefix`` (a trailing dot is implied) and strip it."""
    prefix = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def assign_weights(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, strict=True, assign=True)``, each tensor cast to the
    dtype of the module's own first: the module (built on the meta device, with no random
    initialisation) takes the file's tensors, in its dtypes whatever the file's.

    Raises:
        RuntimeError: Missing, unexpected or wrongly shaped tensors (``load_state_dict``'s).
    """
    own = module.state_dict()
    cast = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
        except SafetensorError as e:  # an I/O error inside safetensors' writer: say which
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            errno_ = int(code.group(1))
            raise OSError(errno_, os.strerror(errno_), str(path)) from e
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def storable_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU, each owning its storage alone, as safetensors requires.

    A CPU tensor that is contiguous and the sole, whole user of its storage is passed as is
    (safetensors writes from its memory), so saving a CPU run costs no second copy of the
    weights (an SD1 run's U-Net, EMA and autoencoder: 7.1 GB, part of what got a full SD1 CPU
    run killed at its first checkpoint on a 24 GiB machine).
    Views, non-contiguous tensors and the second user of a shared storage are copied.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        storage = value.untyped_storage()
        whole = (
            value.is_contiguous()
            and value.storage_offset() == 0
            and storage.nbytes() == value.numel() * value.element_size()
        )
        if value.numel() and (not whole or storage.data_ptr() in seen):
            value = value.contiguous().clone()
        if value.numel():
            seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def save_checkpoint(
    path: str | Path,
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    config: Mapping[str, Any],
    kind: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write modules' state dicts and the config to ``path`` atomically.

    Args:
        path: Destination ``.safetensors`` file.
        modules: ``{"autoencoder": state_dict, "unet": state_dict, ...}``.
        config: The resolved run config (plain containers).
        kind: ``autoencoder`` or ``ldm``.
        extra: More metadata (values are stored as strings).

    Returns:
        The path written.
    """
    from omegaconf import OmegaConf

    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind '{kind}'; expected one of {KINDS}")
    tensors = storable_tensors(
        {f"{name}.{key}": value for name, state in modules.items() for key, value in state.items()}
    )
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": OmegaConf.to_yaml(OmegaConf.create(dict(config))),
    }
    metadata.update({k: str(v) for k, v in (extra or {}).items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata header of a safetensors file (cheap: no tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_checkpoint(path: str | Path, expect_kind: str | None = None) -> Checkpoint:
    """Load one of our checkpoints.

    Args:
        path: A ``.safetensors`` file written by :func:`save_checkpoint`.
        expect_kind: If given, a checkpoint of another kind is an error.

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: Not one of our checkpoints, or of the wrong kind.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an ldm checkpoint (no 'format: ldm' metadata); original Stable "
            "Diffusion files load through ldm.checkpoint.stable_diffusion"
        )
    kind = meta.get("kind", "")
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointError(
            f"{path} is a '{kind}' checkpoint, but a '{expect_kind}' one is needed"
        )
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    config = OmegaConf.to_container(OmegaConf.create(meta.get("config", "{}")), resolve=True)
    return Checkpoint(tensors=tensors, config=config, kind=kind, metadata=meta)  # type: ignore[arg-type]
