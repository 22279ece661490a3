"""`sample.py` on a diffusers folder against diffusers' `StableDiffusionPipeline` on that folder.

Both sides go through their public paths: a tiny random pipeline is built with diffusers' and
transformers' own classes and ``save_pretrained`` to a folder; our side runs ``sample.py``'s
``main()`` on it (``--save-latents`` hands back the final latents), diffusers' side
``StableDiffusionPipeline.from_pretrained`` with the scheduler class the folder names (or another
class built ``from_config`` of the folder's scheduler), ``output_type="latent"``. Same prompts,
negative prompt, guidance (and rescale), η, and the same per-sample seeds: diffusers gets
``generator=[torch.Generator().manual_seed(s) for s in seeds]``, from which it draws each
sample's initial latents and then its sampler's noise, as `sample.py` does, so stochastic
samplers are compared exactly too. Deterministic cases also pass the initial latents as
``latents=``. Final latents agree to ≤ 1e-4 relative (float32, CPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint.test_stable_diffusion import WIDTH, tiny_clip_dir

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore:ClipTextEncoder. prompt of"
)

PROMPTS = ["the red", "a b c"]
NEGATIVE = "x y z"
SEED, SIZE = 100, 16  # 16 px images, 8x8 latents
SD = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny random SD pipeline saved by diffusers, and the pipeline loaded back."""
    root = tmp_path_factory.mktemp("parity")
    clip = tiny_clip_dir(root / "clip")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
        cross_attention_dim=WIDTH, norm_num_groups=32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=SIZE,
    )  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, scheduler=diffusers.DDIMScheduler(**SD),
        text_encoder=transformers.CLIPTextModel.from_pretrained(clip),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    folder = root / "pipe"
    pipe.save_pretrained(folder)
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    return {"root": root, "folder": folder, "pipe": loaded}


def scheduler_folder(base: dict[str, Any], name: str, cls: str, config: dict[str, Any]) -> Path:
    """The base folder with another scheduler: its components linked, a new scheduler config."""
    folder = base["root"] / name
    folder.mkdir()
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        os.symlink(base["folder"] / part, folder / part)
    index = json.loads((base["folder"] / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cls]
    (folder / "model_index.json").write_text(json.dumps(index))
    getattr(diffusers, cls)(**config).save_pretrained(folder / "scheduler")
    return folder


def noise(seeds: list[int]) -> torch.Tensor:
    return torch.cat(
        [
            torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(s))
            for s in seeds
        ]
    )


def ours(
    folder: Path,
    tmp: Path,
    steps: int,
    guidance: float,
    args: list[str] = (),
    batch_size: int = 8,
    seed: int = SEED,
    prompts: list[str] = PROMPTS,
    n: int = 1,
) -> torch.Tensor:
    """Final latents of ``sample.py`` on ``folder`` (prompt i's j-th sample: seed + j)."""
    import sample

    out = tmp / "latents.safetensors"
    argv = [a for p in prompts for a in ("--prompt", p)] + [
        "--ckpt", str(folder), "--negative-prompt", NEGATIVE, "--guidance", str(guidance),
        "--steps", str(steps), "--seed", str(seed), "--height", str(SIZE),
        "--batch-size", str(batch_size), "--n", str(n), "--outdir", str(tmp / "out"),
        "--save-latents", str(out), *args]  # fmt: skip
    assert sample.main(argv) == 0
    return load_file(str(out))["latents"]


def theirs(
    pipe: Any,
    steps: int,
    guidance: float,
    rescale: float = 0.0,
    eta: float = 0.0,
    stochastic: bool = False,
) -> torch.Tensor:
    seeds = [SEED] * len(PROMPTS)  # sample.py: --n 1, so every prompt's sample has --seed
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(
            prompt=PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), height=SIZE, width=SIZE,
            num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=rescale,
            eta=eta, generator=generators, latents=None if stochastic else noise(seeds),
            output_type="latent",
        ).images  # fmt: skip


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.isfinite(b).all(), f"{what}: diffusers' latents are not finite"
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: final latents differ by {err:.2e} (scale {scale:.3g})"


@dataclass
class Case:
    """A scheduler config written into the folder, the sampler run on it, the settings."""

    sampler: str
    spacing: str = "leading"
    steps: int = 7
    karras: bool = False
    v: bool = False
    zsnr: bool = False
    rescale: float = 0.0
    eta: float = 0.0
    guidance: float = 5.0
    clip: float = 0.0  # x̂0 clipping range (0: none)
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        bits = [
            self.sampler + (f"-eta{self.eta:g}" if self.eta else ""),
            self.spacing,
            f"{self.steps}",
        ]
        bits += ["karras"] * self.karras + ["v"] * self.v + ["zsnr"] * self.zsnr
        bits += [f"rescale{self.rescale:g}"] * bool(self.rescale)
        bits += [f"cfg{self.guidance:g}"] * (self.guidance != 5.0)
        bits += [f"clip{self.clip:g}"] * bool(self.clip)
        bits += [f"{k}={v}" for k, v in self.extra.items()]
        return "-".join(bits)

    @property
    def stochastic(self) -> bool:
        return self.sampler in ("ddpm", "euler_a") or bool(self.eta)

    def config(self) -> dict[str, Any]:
        config = {
            **SD,
            "timestep_spacing": self.spacing,
            "prediction_type": "v_prediction" if self.v else "epsilon",
            "rescale_betas_zero_snr": self.zsnr,
            **self.extra,
        }
        if self.karras:
            config["use_karras_sigmas"] = True
        cls = getattr(diffusers, CLASSES[self.sampler])
        keys = set(cls.from_config({}).config)  # only what the class knows
        assert not self.zsnr or "rescale_betas_zero_snr" in keys  # a case that says what it is
        return {k: v for k, v in config.items() if k in keys}


SAMPLERS = [
    ("ddim", 0.0),
    ("ddim", 1.0),
    ("ddpm", 0.0),
    ("euler", 0.0),
    ("euler_a", 0.0),
    ("heun", 0.0),
    ("dpmpp_2m", 0.0),
]
CASES = [
    # every sampler x spacing, 7 steps (T//N is not T/N: DDIM's t -> t - T//N shows)
    *[Case(s, sp, eta=e) for s, e in SAMPLERS for sp in ("leading", "trailing", "linspace")],
    # Karras where diffusers offers it (DPM++: over the whole range, rounded timesteps)
    Case("euler", "leading", karras=True),
    Case("heun", "linspace", karras=True),
    Case("dpmpp_2m", "leading", karras=True),
    Case("dpmpp_2m", "trailing", 20, karras=True),
    # v-prediction with zero terminal SNR (ᾱ_T = 0 for DDIM/DDPM, 2^-24 for Euler/DPM) and
    # guidance rescale. diffusers' Heun has no zero terminal SNR (v and rescale only), and its
    # DDIM with η = 1 gives NaN from t = T - 1 (sqrt(1 - ᾱ' - σ_t²) of a rounding-negative 0)
    *[
        Case(s, "trailing", 3, v=True, zsnr=True, rescale=0.7, eta=e)
        for s, e in SAMPLERS
        if s != "heun" and not e
    ],
    Case("heun", "trailing", 3, v=True, rescale=0.7),
    Case("ddim", "leading", 3, v=True, zsnr=True, rescale=0.7, eta=1.0),
    Case("euler", "linspace", 3, v=True),
    Case("dpmpp_2m", "linspace", 3, v=True),
    # step counts: 1, 2, 20, 50, 1000
    Case("ddim", "trailing", 1, v=True, zsnr=True),
    Case("ddim", "leading", 1),
    Case("euler", "linspace", 1),
    Case("dpmpp_2m", "leading", 1),
    Case("dpmpp_2m", "linspace", 2),
    Case("euler_a", "trailing", 2),
    Case("heun", "trailing", 2),
    Case("ddim", "leading", 50),
    Case("dpmpp_2m", "leading", 20),
    Case("euler", "trailing", 1000, guidance=1.0),
    # final σ: DDIM's set_alpha_to_one, Euler's and DPM's final_sigmas_type (DPM ≥ 15 steps:
    # second-order last step)
    Case("ddim", "leading", 7, extra={"set_alpha_to_one": True}),
    Case("euler", "trailing", 7, extra={"final_sigmas_type": "sigma_min"}),
    Case("dpmpp_2m", "leading", 3, extra={"final_sigmas_type": "sigma_min"}),
    Case("dpmpp_2m", "trailing", 20, extra={"final_sigmas_type": "sigma_min"}),
    # StableDiffusionPipeline resets a folder's steps_offset to 1 and clip_sample to false
    Case("ddim", "leading", 7, extra={"steps_offset": 0}),
    Case("ddpm", "trailing", 7, extra={"clip_sample": True}),
    # x̂0 clipping asked for (DDIM keeps the network's ε̂, DDPM's posterior mean uses the clipped
    # x̂0). DDIM ε, 7 steps, guidance 5 agrees to 4.4e-4 absolute only, on latents of 0.5:
    # that case amplifies float32 rounding ~2x per step, and diffusers' own float32 run is
    # 2.7e-4 from its float64 one (tests/test_clip_sample_precision.py checks it against
    # float64), so here it runs without CFG
    Case("ddim", "leading", 7, guidance=1.0, clip=0.5),
    Case("ddim", "trailing", 3, v=True, zsnr=True, clip=0.5),
    Case("ddpm", "trailing", 7, clip=1.0),
    # guidance <= 1 turns classifier-free guidance off on both sides
    Case("euler", "leading", 3, guidance=1.0),
    Case("ddim", "leading", 3, guidance=0.0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sample_py_matches_stable_diffusion_pipeline(
    base: dict[str, Any], tmp_path: Path, case: Case
) -> None:
    cls = CLASSES[case.sampler]
    folder = scheduler_folder(base, str(case), cls, case.config())
    scheduler = getattr(diffusers, cls).from_pretrained(folder, subfolder="scheduler")
    # the pipeline as from_pretrained(folder) builds it (it resets steps_offset and clip_sample)
    pipe = diffusers.StableDiffusionPipeline(**{**base["pipe"].components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    args = ["--eta", str(case.eta)] if case.sampler == "ddim" else []
    if case.rescale:
        args += ["--guidance-rescale", str(case.rescale)]
    if case.clip:  # asked for on both sides: a scheduler set on the pipeline after it is built
        pipe.scheduler = getattr(diffusers, cls).from_config(
            {**scheduler.config, "clip_sample": True, "clip_sample_range": case.clip}
        )
        args += ["sampling.clip_sample=true", f"sampling.clip_sample_range={case.clip}"]
    mine = ours(folder, tmp_path, case.steps, case.guidance, args)
    ref = theirs(pipe, case.steps, case.guidance, case.rescale, case.eta, case.stochastic)
    assert_close(mine, ref, str(case))


def test_the_scheduler_the_folder_names_and_other_classes_from_its_config(
    base: dict[str, Any], tmp_path: Path
) -> None:
    """The pipeline loaded whole from a folder (its named class), and our --sampler X against
    diffusers' X.from_config(the folder's scheduler config), as users switch schedulers."""
    folder = scheduler_folder(
        base, "named", "DDIMScheduler", {**SD, "timestep_spacing": "trailing"}
    )
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert_close(ours(folder, tmp_path, 4, 5.0), theirs(pipe, 4, 5.0), "named DDIM")
    config = pipe.scheduler.config
    for sampler in ("euler", "dpmpp_2m", "euler_a"):
        pipe.scheduler = getattr(diffusers, CLASSES[sampler]).from_config(config)
        mine = ours(folder, tmp_path, 4, 5.0, ["--sampler", sampler])
        ref = theirs(pipe, 4, 5.0, stochastic=sampler == "euler_a")
        assert_close(mine, ref, f"{sampler} from the DDIM config")


STOCHASTIC = [("ddpm", []), ("euler_a", []), ("ddim", ["--eta", "1"])]


@pytest.mark.parametrize(("sampler", "extra"), STOCHASTIC, ids=[s for s, _ in STOCHASTIC])
def test_a_sample_depends_only_on_its_seed(
    base: dict[str, Any], tmp_path: Path, sampler: str, extra: list[str]
) -> None:
    """Batch of 4 against four batches of 1: each seed gives the same latents."""
    args = ["--sampler", sampler, *extra]
    batched = ours(base["folder"], tmp_path, 3, 5.0, args, batch_size=4, prompts=["the red"], n=4)
    for i in range(4):
        alone = ours(
            base["folder"], tmp_path, 3, 5.0, args, batch_size=1, seed=SEED + i, prompts=["the red"]
        )
        err = (alone[0] - batched[i]).abs().max().item()  # batched BLAS rounding only
        assert err <= 1e-5 * batched.abs().max().item(), (sampler, i, err)
    # the streams are per sample (not one stream for the batch, nor a copy of the initial
    # noise): the sampler's noise changes the result, so other seeds give other latents
    assert (batched[0] - batched[1]).abs().max() > 1e-2
