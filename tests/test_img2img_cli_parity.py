"""img2img and inpainting through `sample.py` against diffusers' pipelines on the same folder.

Both sides go through their public paths. A tiny random pipeline is built with diffusers' and
transformers' classes and ``save_pretrained`` to a folder (and a second one whose U-Net has the 9
input channels of SD inpainting checkpoints); our side runs ``sample.py --init-image PNG
--strength S [--mask PNG] --save-latents F`` on it, diffusers' side
``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline.from_pretrained`` on the
same folder with the same PNGs, ``output_type="latent"``. Same prompts, negative prompt and
guidance, and the same per-sample seeds: diffusers gets ``generator=[Generator().manual_seed(s)
...]`` and the image once per sample, from which each sample draws its init image's posterior,
its noise, its masked image's posterior and its sampler's noise in that order, as `sample.py`
does; so nothing is handed across, and stochastic samplers are compared exactly too. Final
latents agree to ≤ 1e-4 relative (float32, CPU).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_sampling_parity import CLASSES, NEGATIVE, SD, SIZE, assert_close, ours

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore:ClipTextEncoder. prompt of"
)

PROMPTS = ["the red", "a b c"]
N, SEED, GUIDANCE = 2, 40, 5.0  # two samples per prompt: seeds 40, 41 for each prompt


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random SD pipeline saved by diffusers, one with a 9-channel U-Net beside it, and
    the init image and mask PNGs."""
    from tests.checkpoint.test_stable_diffusion import WIDTH, tiny_clip_dir

    root = tmp_path_factory.mktemp("img2img")
    clip = tiny_clip_dir(root / "clip")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=SIZE,
    )  # fmt: skip
    parts = {
        "vae": vae,
        "scheduler": diffusers.DDIMScheduler(**SD),
        "text_encoder": transformers.CLIPTextModel.from_pretrained(clip),
        "tokenizer": transformers.CLIPTokenizer.from_pretrained(clip),
    }
    out = {"root": root}
    for name, channels in (("pipe4", 4), ("pipe9", 9)):
        unet = diffusers.UNet2DConditionModel(
            sample_size=SIZE // 2, in_channels=channels, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
            cross_attention_dim=WIDTH, norm_num_groups=32,
        )  # fmt: skip
        diffusers.StableDiffusionPipeline(
            unet=unet,
            **parts,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(root / name)
        out[name] = root / name
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "init.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 2:10] = 255  # repaint a window, keep the rest
    Image.fromarray(mask).save(root / "mask.png")
    out["init"], out["mask"] = root / "init.png", root / "mask.png"
    return out


def with_scheduler(folders: dict[str, Path], pipe: str, sampler: str) -> Path:
    """``folders[pipe]`` with the scheduler class of ``sampler`` (SD's fields), parts linked."""
    folder = folders["root"] / f"{pipe}-{sampler}"
    if folder.exists():
        return folder
    folder.mkdir()
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        os.symlink(folders[pipe] / part, folder / part)
    index = json.loads((folders[pipe] / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", CLASSES[sampler]]
    (folder / "model_index.json").write_text(json.dumps(index))
    cls = getattr(diffusers, CLASSES[sampler])
    keys = set(cls.from_config({}).config)
    cls(**{k: v for k, v in SD.items() if k in keys}).save_pretrained(folder / "scheduler")
    return folder


def theirs(
    cls: str,
    folder: Path,
    folders: dict[str, Path],
    steps: int,
    strength: float,
    eta: float = 0.0,
    inpaint: bool = False,
) -> torch.Tensor:
    """diffusers' final latents: prompt i's j-th sample has seed SEED + j, as sample.py."""
    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in PROMPTS for _ in range(N)]
    generators = [torch.Generator().manual_seed(SEED + j) for _ in PROMPTS for j in range(N)]
    image = [Image.open(folders["init"]).convert("RGB")] * len(prompts)  # once per sample
    extra: dict[str, Any] = {"eta": eta}
    if inpaint:
        extra |= {
            "mask_image": [Image.open(folders["mask"])] * len(prompts),
            "height": SIZE,
            "width": SIZE,
        }
    with torch.no_grad():
        return pipe(
            prompt=prompts, negative_prompt=[NEGATIVE] * len(prompts), image=image,
            strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
            generator=generators, output_type="latent", **extra,
        ).images  # fmt: skip


def sample_py(
    folders: dict[str, Path],
    folder: Path,
    tmp_path: Path,
    steps: int,
    strength: float,
    eta: float = 0.0,
    inpaint: bool = False,
    batch_size: int = 8,
) -> torch.Tensor:
    args = ["--init-image", str(folders["init"]), "--strength", str(strength)]
    args += ["--mask", str(folders["mask"])] if inpaint else []
    args += ["--eta", str(eta)] if eta else []
    return ours(
        folder,
        tmp_path,
        steps,
        GUIDANCE,
        args,
        batch_size=batch_size,
        seed=SEED,
        prompts=PROMPTS,
        n=N,
    )


IMG2IMG = [
    ("ddim", 10, 0.6),
    ("ddim", 7, 1.0),
    ("euler", 10, 0.6),
    ("euler", 5, 1.0),
    ("dpmpp_2m", 10, 0.6),
    ("dpmpp_2m", 20, 0.45),
    ("heun", 6, 0.5),
    ("euler_a", 8, 0.75),
    ("ddpm", 8, 0.5),
]


@pytest.mark.parametrize(
    ("sampler", "steps", "strength"), IMG2IMG, ids=[f"{s}-{n}-{x:g}" for s, n, x in IMG2IMG]
)
def test_img2img_matches_img2img_pipeline(
    folders: dict[str, Path], tmp_path: Path, sampler: str, steps: int, strength: float
) -> None:
    folder = with_scheduler(folders, "pipe4", sampler)
    mine = sample_py(folders, folder, tmp_path, steps, strength)
    ref = theirs("StableDiffusionImg2ImgPipeline", folder, folders, steps, strength)
    assert_close(mine, ref, f"img2img {sampler} {steps} steps strength {strength}")
    # per-sample seeds: a prompt's two samples differ (their own posterior and noise draws)
    assert (mine[0] - mine[1]).abs().max().item() > 1e-3


def test_img2img_ddim_eta_one(folders: dict[str, Path], tmp_path: Path) -> None:
    """DDIM η = 1: the sampler's noise follows the image posterior and the noise per sample."""
    folder = with_scheduler(folders, "pipe4", "ddim")
    mine = sample_py(folders, folder, tmp_path, 8, 0.7, eta=1.0)
    ref = theirs("StableDiffusionImg2ImgPipeline", folder, folders, 8, 0.7, eta=1.0)
    assert_close(mine, ref, "img2img ddim eta 1")
    # a sample depends on its seed only: the same latents in batches of 1 and of 4
    alone = sample_py(folders, folder, tmp_path, 8, 0.7, eta=1.0, batch_size=1)
    assert (alone - mine).abs().max().item() <= 1e-5 * mine.abs().max().item()


INPAINT = [
    ("pipe4", "ddim", 10, 0.6),
    ("pipe4", "ddim", 6, 1.0),
    ("pipe4", "euler", 10, 0.6),
    ("pipe4", "euler", 6, 1.0),
    ("pipe4", "euler_a", 8, 0.8),
    ("pipe4", "heun", 5, 0.6),
    ("pipe4", "heun", 4, 1.0),
    ("pipe4", "dpmpp_2m", 10, 0.6),
    ("pipe4", "dpmpp_2m", 8, 1.0),
    ("pipe4", "dpmpp_2m", 20, 0.5),
    ("pipe9", "ddim", 6, 1.0),
    ("pipe9", "ddim", 10, 0.6),
    ("pipe9", "euler", 6, 1.0),
    ("pipe9", "euler_a", 6, 0.7),
    ("pipe9", "dpmpp_2m", 8, 1.0),
    ("pipe9", "dpmpp_2m", 10, 0.6),
]


@pytest.mark.parametrize(
    ("pipe", "sampler", "steps", "strength"),
    INPAINT,
    ids=[f"{p}-{s}-{n}-{x:g}" for p, s, n, x in INPAINT],
)
def test_inpainting_matches_inpaint_pipeline(
    folders: dict[str, Path], tmp_path: Path, pipe: str, sampler: str, steps: int, strength: float
) -> None:
    """4-channel U-Nets (latent blending, the multistep dpmpp_2m included) and 9-channel SD
    inpainting U-Nets ([x, mask, masked-image latents] at every call)."""
    folder = with_scheduler(folders, pipe, sampler)
    mine = sample_py(folders, folder, tmp_path, steps, strength, inpaint=True)
    ref = theirs("StableDiffusionInpaintPipeline", folder, folders, steps, strength, inpaint=True)
    assert_close(mine, ref, f"inpaint {pipe} {sampler} {steps} steps strength {strength}")
    if sampler == "euler_a":  # stochastic: batches of 1 give the same latents
        alone = sample_py(folders, folder, tmp_path, steps, strength, inpaint=True, batch_size=1)
        assert (alone - mine).abs().max().item() <= 1e-5 * mine.abs().max().item()
    if pipe == "pipe4":  # the kept region is the init image's latents (the last blend)
        init = mine.new_tensor(np.asarray(Image.open(folders["mask"]))[None, None] >= 128)
        keep = torch.nn.functional.interpolate(init.float(), size=(SIZE // 2,) * 2) == 0
        assert (mine[0] - mine[1]).abs()[keep[0].expand(4, -1, -1)].max() > 1e-4  # posteriors
        assert (mine[0] - mine[1]).abs()[~keep[0].expand(4, -1, -1)].max() > 1e-3


@pytest.fixture(scope="module")
def sd_inpainting_file(folders: dict[str, Path]) -> dict[str, Path]:
    """The 9-channel folder's weights as an original SD single file (sd-v1-5-inpainting's
    layout: CompVis keys, ``in_channels`` 9) and its YAML config."""
    from omegaconf import OmegaConf

    from ldm import assemble
    from tests.checkpoint.test_stable_diffusion import save_sd_file, sd_layout, write_yaml

    model, cfg = assemble.load_for_sampling(str(folders["pipe9"]))
    assert model.unet_in_channels == 9
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"]["text_encoder"]["name_or_path"] = str(folders["root"] / "clip")  # SD1
    root = folders["root"]
    return {
        "file": save_sd_file(sd_layout(model), root / "sd-inpainting.safetensors"),
        "yaml": write_yaml(config, root / "sd-inpainting.yaml"),
    }


@pytest.mark.parametrize(("sampler", "steps", "strength"), [("ddim", 6, 1.0), ("euler", 8, 0.6)])
def test_sd_inpainting_single_file(
    folders: dict[str, Path],
    sd_inpainting_file: dict[str, Path],
    tmp_path: Path,
    sampler: str,
    steps: int,
    strength: float,
) -> None:
    """An SD inpainting single file loads strict and inpaints as diffusers' pipeline on the
    folder it was written from."""
    folder = with_scheduler(folders, "pipe9", sampler)
    args = [
        "-c",
        str(sd_inpainting_file["yaml"]),
        "--sampler",
        sampler,
        "--init-image",
        str(folders["init"]),
        "--strength",
        str(strength),
        "--mask",
        str(folders["mask"]),
        # the YAML has the DDIM folder's spacing; EulerDiscreteScheduler's default is this
        *(["sampling.timestep_spacing=linspace"] if sampler == "euler" else []),
    ]
    mine = ours(
        sd_inpainting_file["file"], tmp_path, steps, GUIDANCE, args, seed=SEED, prompts=PROMPTS, n=N
    )
    ref = theirs("StableDiffusionInpaintPipeline", folder, folders, steps, strength, inpaint=True)
    assert_close(mine, ref, f"SD inpainting file, {sampler} {steps} steps strength {strength}")


def test_sd_inpainting_file_with_a_4_channel_config(
    sd_inpainting_file: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sample

    code = sample.main(
        [
            "--ckpt",
            str(sd_inpainting_file["file"]),
            "-c",
            str(sd_inpainting_file["yaml"]),
            "model.unet.in_channels=4",
            "--prompt",
            "x",
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(err) == 1, err
    assert "SD inpainting checkpoint" in err[0] and "model.unet.in_channels=9" in err[0], err
