"""The behaviour model learns the exact noise prediction of a known conditional Gaussian, and its
samples match the behaviour; networks have the documented shapes and smooth activations."""
import pytest
import torch

from aepo_lite.core import guidance as G
from aepo_lite.device import resolve_device, seed_everything
from aepo_lite.core.diffusion import DiffusionModel, energy_guidance
from aepo_lite.core.nets import EnergyNet, NoiseNet, TwinQ, ValueNet, make_activation
from aepo_lite.core.schedule import VPSchedule


def _behaviour(s):
    """a | s ~ N(0.6 s, 0.15^2) in 1D, state in [-1, 1]."""
    return 0.6 * s, 0.15**2


def test_learned_eps_matches_exact_conditional_gaussian():
    gen = seed_everything(0)
    sch = VPSchedule()
    model = DiffusionModel(NoiseNet(action_dim=1, state_dim=1, hidden=64, n_blocks=2), sch)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(1500):
        s = torch.rand(256, 1, generator=gen) * 2 - 1
        mean, var = _behaviour(s)
        a0 = mean + var**0.5 * torch.randn(256, 1, generator=gen)
        loss = model.loss(a0, s, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # compare with the exact eps of N(0.6 s, 0.15^2) on fresh noisy points, t in [0.05, 1]
    s = torch.rand(4000, 1, generator=gen) * 2 - 1
    t = 0.05 + 0.95 * torch.rand(4000, generator=gen)
    mean, var = _behaviour(s)
    a0 = mean + var**0.5 * torch.randn(4000, 1, generator=gen)
    a_t, _ = sch.diffuse(a0, t, generator=gen)
    al, sg = sch.alpha_sigma(t)
    exact = sg[:, None] * (a_t - al[:, None] * mean) / (al[:, None] ** 2 * var + sg[:, None] ** 2)
    with torch.no_grad():
        learned = model.eps(a_t, t, s)
    rel = float(((learned - exact) ** 2).mean() / (exact**2).mean())
    assert rel < 0.05, rel
    # samples: conditional median and spread (MAD, robust to a few stray samples of a short
    # training run) at three states
    for s0 in (-0.8, 0.0, 0.8):
        cond = torch.full((4000, 1), s0)
        x = model.sample(cond=cond, n_steps=15, generator=gen).squeeze(-1)
        med = float(x.median())
        mad_std = 1.4826 * float((x - med).abs().median())
        assert abs(med - 0.6 * s0) < 0.05, (s0, med)
        assert abs(mad_std - 0.15) < 0.04, (s0, mad_std)


def test_network_shapes_and_dtypes():
    B = 7
    s, a, t = torch.randn(B, 5), torch.randn(B, 3), torch.rand(B)
    assert NoiseNet(3, 5, hidden=32)(a, t, s).shape == (B, 3)
    assert NoiseNet(3, 0, hidden=32)(a, t, None).shape == (B, 3)
    q1, q2 = TwinQ(5, 3, hidden=32)(s, a)
    assert q1.shape == q2.shape == (B,)
    assert ValueNet(5, hidden=32)(s).shape == (B,)
    f = EnergyNet(3, 5, hidden=32)
    assert f(s, a, t).shape == (B,)
    f64 = EnergyNet(3, 5, hidden=32).double()
    assert f64(s.double(), a.double(), t.double()).dtype == torch.float64
    grad = energy_guidance(f)(a, t, s)
    assert grad.shape == (B, 3) and not grad.requires_grad
    # guidance is the autograd gradient of the energy
    x = a.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(f(s, x, t).sum(), x)
    assert torch.allclose(grad, ref)


def test_energy_net_is_smooth_in_the_action():
    """A smooth critic/energy has a non-zero, varying Hessian (ReLU nets would give zero)."""
    torch.manual_seed(0)
    f = EnergyNet(2, 0, hidden=32)
    a, t = torch.randn(4, 2, requires_grad=True), torch.rand(4)
    (g,) = torch.autograd.grad(f(None, a, t).sum(), a, create_graph=True)
    (h,) = torch.autograd.grad(g[:, 0].sum(), a)
    assert float(h.abs().max()) > 1e-6
    with pytest.raises(ValueError, match="activation"):
        make_activation("swish")
    # ReLU is offered (for critics only evaluated), and it is why it is not the default: no curvature
    q = TwinQ(3, 2, hidden=32, activation="relu")
    x = torch.randn(5, 2, requires_grad=True)
    (g,) = torch.autograd.grad(q.q_min(torch.randn(5, 3), x).sum(), x, create_graph=True)
    assert float(g.detach().abs().max()) > 0
    h = torch.autograd.grad(g[:, 0].sum(), x, allow_unused=True)[0] if g.requires_grad else None
    assert h is None or float(h.abs().max()) == 0


@pytest.mark.parametrize("act", ["silu", "mish", "gelu", "tanh", "relu"])
def test_no_grad_forward_in_place_matches_autograd_forward(act):
    """Under no_grad the MLP blocks overwrite their activations; the numbers must not change and the
    input must not be touched."""
    torch.manual_seed(1)
    s, a, t = torch.randn(64, 5), torch.rand(64, 3) * 2 - 1, torch.rand(64)
    nets = [(TwinQ(5, 3, hidden=32, depth=3, activation=act), lambda n: torch.stack(n(s, a))),
            (TwinQ(5, 3, hidden=32, depth=2, activation=act, layer_norm=True), lambda n: torch.stack(n(s, a))),
            (NoiseNet(3, 5, hidden=32, n_blocks=2, activation=act), lambda n: n(a, t, s)),
            (EnergyNet(3, 5, hidden=32, depth=3, activation=act), lambda n: n(s, a, t))]
    s0, a0 = s.clone(), a.clone()
    for net, call in nets:
        ref = call(net)
        assert ref.requires_grad
        with torch.no_grad():
            out = call(net)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(s, s0) and torch.equal(a, a0)


def test_device_switch():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


def test_seed_makes_runs_repeatable():
    outs = []
    for _ in range(2):
        gen = seed_everything(123)
        model = DiffusionModel(NoiseNet(2, 0, hidden=16, n_blocks=1))
        outs.append(model.sample(n=5, n_steps=4, generator=gen))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_gaussian_eps_batched_times_match_single_time():
    sch = VPSchedule()
    m, S = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 0.3
    a = torch.randn(6, 2, dtype=torch.float64)
    t_mixed = torch.tensor([0.1, 0.1, 0.5, 0.5, 0.9, 0.9], dtype=torch.float64)
    mixed = G.gaussian_eps(a, t_mixed, m, S, sch)
    for i in range(0, 6, 2):
        same = G.gaussian_eps(a[i:i + 2], t_mixed[i:i + 2], m, S, sch)
        assert torch.allclose(mixed[i:i + 2], same)


def _guided_pair(seed=0):
    torch.manual_seed(seed)
    model = DiffusionModel(NoiseNet(2, 3, hidden=16, n_blocks=1), VPSchedule()).requires_grad_(False)
    f = EnergyNet(2, 3, hidden=16, depth=2)
    return model, f, torch.randn(6, 3), torch.randn(6, 2)


@pytest.mark.parametrize("solver", ["dpmpp2m", "dpm2", "ddim"])
def test_fused_guided_eps_matches_the_guidance_function(solver):
    """FusedGuidedEps (torch.func.grad) gives the sampler the same guided prediction as energy_guidance
    (autograd.grad); guidance_t_max guides only the evaluations at t <= t_max, as masking by hand does."""
    from aepo_lite.core.diffusion import FusedGuidedEps, sample
    model, f, s, x_T = _guided_pair()
    kw = dict(schedule=model.schedule, cond=s, n_steps=6, solver=solver, guidance_scale=2.0)
    ref = sample(model.eps, x_T, guidance=energy_guidance(f), **kw)
    fused = sample(model.eps, x_T, guided_eps=FusedGuidedEps(model.eps, f), **kw)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    plain = energy_guidance(f)
    masked = sample(model.eps, x_T, guidance=lambda a, t, c: plain(a, t, c) * (t <= 0.4).to(a.dtype)[:, None], **kw)
    for how in (dict(guidance=plain), dict(guided_eps=FusedGuidedEps(model.eps, f))):
        torch.testing.assert_close(sample(model.eps, x_T, guidance_t_max=0.4, **how, **kw), masked, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked, ref)  # the cut changes the result: the test above can fail
    with pytest.raises(ValueError, match="guided_eps"):
        sample(model.eps, x_T, guidance=plain, guided_eps=FusedGuidedEps(model.eps, f), **kw)
    with pytest.raises(ValueError, match="guidance_t_max"):
        sample(model.eps, x_T, guidance=plain, guidance_t_max=-1.0, **kw)


def test_compiled_guided_sampler_matches_eager_on_cpu():
    """compile=True: torch.compile traces eps, the energy and its gradient into one graph (CUDA graphs
    on CUDA). On the CPU it must give the eager numbers, and new scales or steps must not recompile."""
    pytest.importorskip("torch._inductor")
    import shutil
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    from aepo_lite.core.diffusion import FusedGuidedEps, sample
    import torch._dynamo
    model, f, s, x_T = _guided_pair(1)
    kw = dict(schedule=model.schedule, cond=s, n_steps=5, solver="dpm2")
    comp = FusedGuidedEps(model.eps, f, compile=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for w in (1.0, 3.0):  # another scale (and every step's t, sigma and midpoints) reuses the graph
            ref = sample(model.eps, x_T, guidance=energy_guidance(f), guidance_scale=w, **kw)
            out = sample(model.eps, x_T, guided_eps=comp, guidance_scale=w, **kw)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
