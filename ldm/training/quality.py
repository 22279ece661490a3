"""Quality metrics during training: FID/KID, CLIP score and shapes adherence, every N steps.

A fixed evaluation set — sample ``i`` takes prompt ``i mod len(prompts)`` and the initial noise
of seed ``seed + i``, as ``sample.py`` and ``python -m ldm.eval.quality`` do — so successive
evaluations differ only by the weights. Rank r generates samples ``r, r + world, ...``; every
rank runs the same number of batches (the last ones padded and dropped), which FSDP's
collectives need. Statistics are summed and rows gathered over ranks; rank 0 logs
``quality/fid``, ``quality/kid``, ``quality/clip_score``, ``quality/adherence_<attr>`` and
``quality/seconds``. Uses the EMA weights when the run keeps an EMA.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.eval.fid import FeatureStats, frechet_distance, kid, load_stats
from ldm.eval.inception import FEATURE_DIM
from ldm.eval.stats import gather_rows


class QualityMonitor(pl.Callback):
    """Evaluate every ``every_n_steps`` optimizer steps (see :class:`ldm.schema.QualityConfig`).

    Args:
        every_n_steps: Interval (> 0).
        prompts: Prompts, cycled over the samples.
        n: Samples per evaluation.
        batch_size: Generation batch per rank.
        sampler: A configured ``Sampler``.
        guidance: CFG scale.
        negative_prompt: Replaces the unconditional context.
        size: Image side in pixels.
        seed: Seed of sample 0.
        ref, inception: Reference statistics and local Inception weights (FID, KID).
        clip: Local CLIP folder (CLIP score).
        shapes_metadata: A shapes dataset's ``metadata.json`` (adherence with its geometry).
        kid_subset_size: KID subset size.
    """

    def __init__(
        self,
        every_n_steps: int,
        prompts: list[str],
        n: int,
        batch_size: int,
        sampler: Any,
        guidance: float,
        negative_prompt: str,
        size: int,
        seed: int = 0,
        ref: str | None = None,
        inception: str | None = None,
        clip: str | None = None,
        shapes_metadata: str | None = None,
        kid_subset_size: int = 1000,
    ) -> None:
        if not prompts:
            raise ValueError(
                "quality.every_n_steps is set but there are no prompts: set "
                "quality.prompts, quality.prompts_file or sampling.prompts"
            )
        if bool(ref) != bool(inception):
            raise ValueError("quality.ref and quality.inception go together (FID needs both)")
        if not (ref or clip or shapes_metadata):
            raise ValueError(
                "quality.every_n_steps is set but nothing is measured: set "
                "quality.ref + quality.inception, quality.clip or "
                "quality.shapes_metadata"
            )
        self.every, self.prompts, self.n, self.batch_size = every_n_steps, prompts, n, batch_size
        self.sampler, self.guidance, self.negative = sampler, guidance, negative_prompt
        self.size, self.seed, self.kid_subset_size = size, seed, kid_subset_size
        self.ref, self.inception_path, self.clip_path = ref, inception, clip
        self.shapes_metadata = shapes_metadata
        if ref:
            load_stats(ref)  # fail at start, not at the first evaluation
            for path in (inception,):
                if not Path(path).is_file():
                    raise FileNotFoundError(f"quality.inception: no file at {path}")
        self._extractors: dict[str, Any] | None = None
        self._last = -1

    def _load(self, device: torch.device) -> dict[str, Any]:
        if self._extractors is None:
            ex: dict[str, Any] = {}
            if self.ref:
                from ldm.eval.inception import load_fid_inception

                ex["inception"] = load_fid_inception(self.inception_path, device)
                with __import__("numpy").load(self.ref, allow_pickle=False) as f:
                    ex["ref_features"] = (
                        torch.from_numpy(f["features"]) if "features" in f else None
                    )
            if self.clip_path:
                from ldm.eval.clip_score import CLIPScorer

                ex["clip"] = CLIPScorer(self.clip_path, device)
            if self.shapes_metadata:
                from ldm.eval.adherence import geometry_from_metadata

                ex["geometry"] = geometry_from_metadata(self.shapes_metadata)
            self._extractors = ex
        return self._extractors

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._last:
            return
        self._last = step
        metrics = self.evaluate(pl_module, trainer.global_rank, trainer.world_size)
        if trainer.is_global_zero:
            if trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=step)
            shown = ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items())
            print(f"quality at step {step}: {shown}", flush=True)

    @torch.no_grad()
    def evaluate(self, pl_module: Any, rank: int, world: int) -> dict[str, float]:
        """All metrics over all ranks (every rank must call it)."""
        start = time.perf_counter()
        model, device = pl_module.model, pl_module.device
        ex = self._load(device)
        net = pl_module.ema.model if getattr(pl_module, "ema", None) is not None else None
        unet = net or model.unet
        was_training = unet.training
        unet.eval()
        per_rank = math.ceil(self.n / world)
        mine = [rank + world * k for k in range(per_rank)]
        stats, rows, clip_scores = FeatureStats(FEATURE_DIM), [], []
        adherence = torch.zeros(2, dtype=torch.float64)  # (correct, scored)
        for b in range(0, per_rank, self.batch_size):
            idx = mine[b : b + self.batch_size]
            prompts = [self.prompts[i % len(self.prompts)] for i in idx]
            generators = [torch.Generator().manual_seed(self.seed + i) for i in idx]
            images, _ = model.generate(
                prompts,
                self.sampler,
                guidance=self.guidance,
                negative_prompts=self.negative,
                height=self.size,
                width=self.size,
                net=net,
                generator=generators,
            )
            keep = [j for j, i in enumerate(idx) if i < self.n]  # padding for equal batch counts
            images, prompts = images[keep], [prompts[j] for j in keep]
            if not keep:
                continue
            if "inception" in ex:
                f = ex["inception"](images.to(device)).cpu()
                stats.update(f)
                rows.append(f)
            if "clip" in ex:
                clip_scores.append(ex["clip"].scores(images, prompts).cpu())
            if "geometry" in ex:
                from ldm.eval.adherence import score_pairs

                for s in score_pairs(
                    zip(prompts, images.cpu(), strict=True), geometry=ex["geometry"]
                ):
                    adherence += torch.tensor(
                        [sum(s.correct.values()), len(s.correct)], dtype=torch.float64
                    )
        unet.train(was_training)
        return self._reduce(ex, stats, rows, clip_scores, adherence, start)

    def _reduce(
        self,
        ex: dict[str, Any],
        stats: FeatureStats,
        rows: list[torch.Tensor],
        clip_scores: list[torch.Tensor],
        adherence: torch.Tensor,
        start: float,
    ) -> dict[str, float]:
        import torch.distributed as dist

        metrics: dict[str, float] = {}
        if "inception" in ex:
            stats.all_reduce()
            mu, sigma = load_stats(self.ref)
            metrics["quality/fid"] = frechet_distance(*stats.mean_cov(), mu, sigma)
            fake = gather_rows(torch.cat(rows) if rows else torch.zeros(0, FEATURE_DIM))
            if ex["ref_features"] is not None:
                metrics["quality/kid"] = kid(
                    ex["ref_features"], fake, subset_size=self.kid_subset_size
                )[0]
        if "clip" in ex:
            scores = gather_rows(
                torch.cat(clip_scores)[:, None] if clip_scores else torch.zeros(0, 1)
            )
            metrics["quality/clip_score"] = float(scores.mean())
        if "geometry" in ex:
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(adherence)
            metrics["quality/adherence"] = float(adherence[0] / adherence[1].clamp_min(1))
        metrics["quality/seconds"] = time.perf_counter() - start
        return metrics


def build_quality_monitor(cfg: Any, sampler: Any) -> QualityMonitor | None:
    """The callback from a run config's ``quality`` section (None when disabled)."""
    q = cfg.quality
    if not q.every_n_steps:
        return None
    if cfg.task != "ldm":
        raise ValueError("quality.every_n_steps is for ldm runs (task: ldm)")
    prompts = list(q.prompts)
    if q.prompts_file:
        path = Path(q.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"quality.prompts_file not found: {path}")
        prompts += [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    prompts = prompts or list(cfg.sampling.prompts)
    return QualityMonitor(
        q.every_n_steps,
        prompts,
        q.n,
        q.batch_size,
        sampler,
        cfg.sampling.guidance,
        cfg.sampling.negative_prompt,
        int(cfg.data.image_size),
        q.seed,
        q.ref,
        q.inception,
        q.clip,
        q.shapes_metadata,
        q.kid_subset_size,
    )
