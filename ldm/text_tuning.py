"""What trains in the text encoder of a fine-tune, and its trained weights in our checkpoints.

``model.train_text_encoder`` unfreezes the whole encoder; ``model.lora.text_encoder`` adds LoRA
adapters (Hu et al. 2021) to its transformers model, on ``model.lora.text_encoder_targets``.
Either way its trainable weights train at ``optim.text_encoder_lr`` (a parameter group of the
Lightning module), go into ``resume.ckpt`` and into every exported checkpoint as
``text_encoder.*``; the frozen rest is rebuilt from the config, like the frozen U-Net base.

SDXL's two-encoder conditioner (``kind: sdxl``) trains both encoders the same way, as kohya's
``sdxl_train_network`` (``lora_te1_``/``lora_te2_``) and diffusers'
``train_dreambooth_lora_sdxl`` (``text_encoder``, ``text_encoder_2``) do: CLIP ViT-L
(``text_encoder.text_encoder.*`` in our checkpoints) and ViT-bigG
(``text_encoder.text_encoder_2.*``; unfrozen with its ``text_projection``, so the pooled vector
follows its weights); the refiner has the second only.

Whatever the encoder's output never reaches stays frozen (:func:`freeze_unreached`): SDXL's first
encoder past its penultimate layer, a BERT pooler, the layers after ``layer: penultimate``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from ldm.checkpoint.format import Checkpoint, CheckpointError
from ldm.models.lora import LoRALinear, add_lora


def trainable_text_encoder(text_encoder: nn.Module, m: DictConfig) -> nn.Module:
    """Unfreeze the text encoder's weights (``model.train_text_encoder``) or add LoRA adapters
    to its transformers model (``model.lora.text_encoder``); as built otherwise.

    Raises:
        ValueError: An encoder that is no transformers model (the config's other
            contradictions are refused at load time, `ldm.consistency`).
    """
    if not (m.train_text_encoder or m.lora.text_encoder):
        return text_encoder
    models = transformers_models(text_encoder)
    if not models:
        raise ValueError(
            f"training the text encoder needs a transformers model (kind clip, "
            f"hf, t5 or sdxl), not kind={m.text_encoder.kind}"
        )
    for model in models:
        if m.train_text_encoder:
            model.requires_grad_(True)
        else:
            add_lora(model, m.lora.rank, m.lora.alpha, m.lora.dropout,
                     list(m.lora.text_encoder_targets))  # fmt: skip
    freeze_unreached(text_encoder)
    return text_encoder


def freeze_unreached(text_encoder: nn.Module) -> list[str]:
    """Freeze the trainable weights the encoder's output never reaches, found from the autograd
    graph of one probe encoding (a forward pass, no backward): SDXL's first encoder past the
    penultimate hidden states it is read at (Podell et al. 2023, sec. 2.1: its last layer and
    final norm), a pooler (BERT/MiniLM's ``pooler.dense``) and, with ``layer: penultimate`` or a
    block number, the layers after the one read (SD2's OpenCLIP, our MiniLM configs). Without
    this they never get a gradient, and DDP's default ``find_unused_parameters=False`` stops the
    run (Lightning: parameters not used in producing the loss); nor do they hold optimizer
    state. LoRA adapters there are folded away (B = 0: exact). Encoders on the meta device are
    left as they are (nothing can run on them).

    Returns:
        The names of the weights frozen (adapters: the layer's name).
    """
    params = [p for p in text_encoder.parameters() if p.requires_grad]
    if not params or any(p.is_meta for p in params):
        return []
    with torch.enable_grad():
        out = text_encoder.encode(["a photo"])
    reached = _graph_leaves([t.grad_fn for t in out if isinstance(t, torch.Tensor)])
    frozen = []
    for name, module in list(text_encoder.named_modules()):
        if isinstance(module, LoRALinear) and id(module.lora_up.weight) not in reached:
            parent, _, child = name.rpartition(".")
            merged = module.merged().requires_grad_(False)
            setattr(text_encoder.get_submodule(parent), child, merged)
            frozen.append(name)
    for name, p in text_encoder.named_parameters():
        if p.requires_grad and id(p) not in reached:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def _graph_leaves(roots: list) -> set[int]:
    """``id`` of every leaf tensor (parameter) an autograd graph accumulates gradients into."""
    leaves: set[int] = set()
    seen: set = set()  # the nodes themselves (kept alive, so no id is reused)
    stack = [fn for fn in roots if fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: the leaf it writes .grad of
            leaves.add(id(fn.variable))
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return leaves


def _untrained_adapter(state: dict, key: str) -> bool:
    """Whether ``key`` is half of a LoRA adapter whose up-projection is all zeros (written by
    versions before :func:`freeze_unreached`, where unreached adapters stayed in)."""
    for half in (".lora_down.weight", ".lora_up.weight"):
        if key.endswith(half):
            up = state.get(key[: -len(half)] + ".lora_up.weight")
            return up is not None and not up.any()
    return False


def transformers_models(text_encoder: nn.Module) -> list[nn.Module]:
    """The transformers models a text encoder trains: SDXL's two (one on the refiner), the
    ``.model`` of the others; empty for an encoder without one."""
    if hasattr(text_encoder, "text_encoder_2"):  # ldm.models.conditioner.SDXLConditioner
        return [
            e for e in (text_encoder.text_encoder, text_encoder.text_encoder_2) if e is not None
        ]
    model = getattr(text_encoder, "model", None)
    return [model] if hasattr(model, "config") else []


def load_text_encoder_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load the trained text-encoder weights a checkpoint carries (``text_encoder.*``: all of
    them after full fine-tuning, the adapters after text-encoder LoRA) over the built encoder.

    Raises:
        CheckpointError: A key the model's text encoder lacks, or a shape that differs.
    """
    state = ckpt.module_state("text_encoder")
    if not state:
        return
    own = model.text_encoder.state_dict()
    for key in [k for k in state if k not in own and _untrained_adapter(state, k)]:
        del state[key]  # an adapter that never trained (B = 0), since folded away: exact
    for key, value in state.items():
        if key not in own or own[key].shape != value.shape:
            raise CheckpointError(
                f"checkpoint key text_encoder.{key} does not fit the text "
                "encoder the config builds (model.text_encoder, model.lora)"
            )
    model.text_encoder.load_state_dict(state, strict=False)
