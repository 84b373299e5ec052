"""The hand-written MLP log-likelihood gradient against autograd through `stacked_logits`."""

import pytest
import torch
from torch import nn

from robustbnn.inference.mlp_grad import mlp_plan, nll_and_grad
from robustbnn.nets import init_params, template
from robustbnn.forward import flatten, param_layout, stacked_logits, unflatten


def autograd_nll_and_grad(net, layout, q, x, y, mask=None, per_chain=False):
    q = q.detach().requires_grad_(True)
    logits = stacked_logits(net, unflatten(q, layout), x, per_sample_inputs=per_chain)
    yy = (y.view(1, -1) if y.dim() == 1 else y).expand(len(q), -1).unsqueeze(-1)
    nll = -logits.log_softmax(-1).gather(-1, yy).squeeze(-1)
    if mask is not None:
        nll = nll * mask
    nll = nll.sum(-1)
    (g,) = torch.autograd.grad(nll.sum(), q)
    return nll.detach(), g


def positions(net, chains, seed=0):
    layout = param_layout(dict(net.named_parameters()))
    gen = torch.Generator().manual_seed(seed)
    q = torch.stack([flatten(dict(net.named_parameters()), layout).detach() for _ in range(chains)])
    return layout, q + 0.5 * torch.randn(q.shape, generator=gen)


@pytest.mark.parametrize("activation", ["relu", "leaky", "sigm", "tanh"])
def test_matches_autograd_on_shared_inputs(activation):
    spec = dict(architecture="fc2", input_shape=(1, 4, 4), num_classes=3, hidden_size=7, activation=activation)
    net = template(spec)
    layout, q = positions(net, 3)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(11, 1, 4, 4, generator=gen), torch.randint(3, (11,), generator=gen)
    mask = (torch.arange(11) < 8).float()
    plan = mlp_plan(net, layout, (1, 4, 4))
    assert plan is not None
    for m in (None, mask):
        nll, g = nll_and_grad(plan, q, x, y, m, scale=2.5)
        ref_nll, ref_g = autograd_nll_and_grad(net, layout, q, x, y, m)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, 2.5 * ref_g, rtol=1e-4, atol=1e-5)


def test_matches_autograd_on_per_chain_batches_and_bias_free_layers():
    net = nn.Sequential(nn.Flatten(), nn.Linear(5, 6, bias=False), nn.LeakyReLU(0.2), nn.Linear(6, 6), nn.Tanh(),
                        nn.Linear(6, 4), nn.Identity())
    layout, q = positions(net, 2)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 9, 5, generator=gen), torch.randint(4, (2, 9), generator=gen)
    nll, g = nll_and_grad(mlp_plan(net, layout, (5,)), q, x, y)
    ref_nll, ref_g = autograd_nll_and_grad(net, layout, q, x, y, per_chain=True)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-5)


def test_other_networks_have_no_plan():
    conv = template(dict(architecture="conv", input_shape=(1, 28, 28), num_classes=10, hidden_size=8,
                         activation="relu"))
    assert mlp_plan(conv, param_layout(dict(conv.named_parameters())), (1, 28, 28)) is None
    gelu = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    assert mlp_plan(gelu, param_layout(dict(gelu.named_parameters())), (3,)) is None
    fc = template(dict(architecture="fc2", input_shape=(2,), num_classes=2, hidden_size=4, activation="relu"))
    params = init_params(dict(architecture="fc2", input_shape=(2,), num_classes=2, hidden_size=4,
                              activation="relu"), 0)
    reordered = list(reversed(param_layout(params)))  # a layout that is not the network's own order
    assert mlp_plan(fc, reordered, (2,)) is None
    no_flatten = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # on (2, 2) inputs: not an MLP of them
    assert mlp_plan(no_flatten, param_layout(dict(no_flatten.named_parameters())), (2, 2)) is None
    assert mlp_plan(no_flatten, param_layout(dict(no_flatten.named_parameters())), (4,)) is not None
    act_first = nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(4, 2))  # would act in place on the inputs
    assert mlp_plan(act_first, param_layout(dict(act_first.named_parameters())), (4,)) is None
    two_acts = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Tanh(), nn.Linear(3, 2))  # one buffer, two backwards
    assert mlp_plan(two_acts, param_layout(dict(two_acts.named_parameters())), (4,)) is None


def test_hmc_potential_gradient_over_chunks_matches_autograd():
    """`hmc.bnn_value_and_grad` (hand-written, data in ragged chunks, reused buffers, called twice) against
    autograd through `hmc.bnn_potential` over all the data at once."""
    from robustbnn.inference.hmc import bnn_potential, bnn_value_and_grad, log_prior
    from robustbnn.inference.hmc_kernel import autograd_value_and_grad
    from robustbnn.forward import activation_numel

    spec = dict(architecture="fc2", input_shape=(3,), num_classes=4, hidden_size=9, activation="relu")
    net = template(spec)
    layout, q = positions(net, 3)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(301, 3, generator=gen), torch.randint(4, (301,), generator=gen)
    budget = 70 * 3 * activation_numel(net, (3,)) * 3  # chunks of 70 rows for 3 chains: 5 chunks, the last of 21
    value_and_grad = bnn_value_and_grad(spec, x, y, prior_scale=0.7, budget=budget, compile=False)
    reference = autograd_value_and_grad(bnn_potential(spec, x, y, prior_scale=0.7))
    for qq in (q, q + 0.1):  # the second call reuses the buffers of the first
        ref_u, ref_g = reference(qq)
        u, g, loglik = value_and_grad(qq)
        torch.testing.assert_close(u, ref_u, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loglik, -(ref_u + log_prior(qq, 0.7)), rtol=1e-6, atol=1e-4)


def test_confident_networks_keep_exact_values_and_no_denormal_softmax():
    """Logit gaps of hundreds (a well-fit chain's): the floored softmax head (`LOG_FLOOR`) gives the exact
    negative log-likelihood, also for points whose true class is far below the top one (nll > 60), and the
    gradient of autograd, without a denormal probability anywhere in the computation."""
    torch.set_flush_denormal(False)  # as a library user's process runs (the command line flushes them)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))
    layout, q = positions(net, 2)
    q = q * 12.0  # logits of order +-300
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 3, generator=gen), torch.randint(5, (40,), generator=gen)
    nll, g = nll_and_grad(mlp_plan(net, layout, (3,)), q, x, y)
    ref_nll, ref_g = autograd_nll_and_grad(net, layout, q, x, y)
    logits = stacked_logits(net, unflatten(q, layout), x)
    gaps = logits - logits.amax(-1, keepdim=True)
    denormal = (gaps.exp() > 0) & (gaps.exp() < torch.finfo(torch.float32).tiny)
    assert denormal.any() and (gaps.gather(-1, y.expand(2, -1)[..., None]) < -60).any()
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-3)
    seen = []
    real_exp = torch.Tensor.exp_

    def spy(t):
        out = real_exp(t)
        seen.append(((out > 0) & (out < torch.finfo(torch.float32).tiny)).any().item())
        return out

    torch.Tensor.exp_ = spy
    try:
        nll_and_grad(mlp_plan(net, layout, (3,)), q, x, y)
    finally:
        torch.Tensor.exp_ = real_exp
    assert seen == [False]


def test_level_2_cache_size_read_from_sysfs(tmp_path):
    from robustbnn.inference.bnn_target import _l2_bytes

    for index, (level, size) in enumerate([("1", "32K"), ("1", "32K"), ("2", "1024K"), ("3", "32768K")]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    (tmp_path / "a_file").write_text("not a cache\n")  # sysfs keeps files (uevent) beside the index folders
    assert _l2_bytes(root=str(tmp_path)) == 2**20
    (tmp_path / "index2" / "size").write_text("2M\n")
    assert _l2_bytes(root=str(tmp_path)) == 2 * 2**20
    assert _l2_bytes(default=12345, root=str(tmp_path / "missing")) == 12345
