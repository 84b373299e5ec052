"""Architectures and the Posterior: shapes, vectorised predictions, chunking, save/load."""

import math

import pytest
import torch

from robustbnn.errors import UserError
from robustbnn.nets import init_params, make_net
from robustbnn.posterior import Posterior, log_mean_softmax

CONV = dict(architecture="conv", input_shape=[1, 28, 28], num_classes=10, hidden_size=16, activation="leaky")
FC2 = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=8, activation="tanh")


def stacked(spec, seeds):
    ps = [init_params(spec, s) for s in seeds]
    return {k: torch.stack([p[k] for p in ps]) for k in ps[0]}


@pytest.mark.parametrize("shape", [[1, 28, 28], [3, 32, 32], [1, 20, 17]])
def test_conv_any_input_size(shape):
    net = make_net("conv", shape, 10, 16, "relu")
    assert net(torch.rand(2, *shape)).shape == (2, 10)


def test_conv_matches_paper_parameter_count():
    # original-behaviour.md: conv H=512 on MNIST has 661,834 parameters, fc2 H=512 669,706
    assert sum(p.numel() for p in make_net("conv", [1, 28, 28], 10, 512, "leaky").parameters()) == 661_834
    assert sum(p.numel() for p in make_net("fc2", [1, 28, 28], 10, 512, "leaky").parameters()) == 669_706
    assert sum(p.numel() for p in make_net("fc2", [2], 2, 128, "leaky").parameters()) == 17_154


def test_bad_architecture_and_activation():
    with pytest.raises(UserError):
        make_net("resnet", [2], 2, 8, "relu")
    with pytest.raises(UserError):
        make_net("fc", [2], 2, 8, "gelu")
    with pytest.raises(UserError):
        make_net("conv", [2], 2, 8, "relu")


def test_init_params_seeded():
    a, b, c = init_params(FC2, 3), init_params(FC2, 3), init_params(FC2, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])


def test_vectorised_logits_equal_per_sample_loop():
    params = stacked(CONV, range(3))
    post = Posterior(CONV, params)
    x = torch.rand(5, 1, 28, 28)
    net = make_net(**CONV)
    for s in range(3):
        net.load_state_dict({k: v[s] for k, v in params.items()})
        torch.testing.assert_close(post.logits(x)[s], net(x), rtol=1e-5, atol=1e-5)


def test_predictive_is_mean_of_softmax_and_chunking_is_exact():
    post = Posterior(FC2, stacked(FC2, range(7)))
    x = torch.rand(33, 2)
    logits = post.logits(x)
    expected = torch.softmax(logits, -1).mean(0)
    torch.testing.assert_close(post.predictive(x), expected)
    tiny = post.logits(x, budget=40)  # forces many sample and input chunks
    assert post.chunks(33, budget=40) != post.chunks(33)
    torch.testing.assert_close(tiny, logits)


def test_log_mean_softmax_is_stable():
    logits = torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]])
    out = log_mean_softmax(logits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp(), torch.tensor([[0.5, 0.5]]))
    assert math.isclose(out[0, 0].item(), math.log(0.5), rel_tol=1e-6)


def test_take_prefix_and_too_many_samples():
    post = Posterior(FC2, stacked(FC2, range(4)))
    assert post.take(2).n_samples == 2
    assert torch.equal(post.take(2).params["1.weight"], post.params["1.weight"][:2])
    with pytest.raises(UserError, match="holds 4"):
        post.take(5)


def test_save_load_bit_identical(tmp_path):
    post = Posterior(CONV, stacked(CONV, range(2)), meta={"kind": "ensemble"})
    post.save(tmp_path / "m")
    back = Posterior.load(tmp_path / "m", spec=CONV)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(back.logits(x), post.logits(x))
    assert back.meta["kind"] == "ensemble"
    assert not list((tmp_path / "m").glob(".*tmp*")), "no temporary files left behind"


def test_guide_posterior_redraws_nested_samples(tmp_path):
    loc = init_params(FC2, 0)
    scale = {k: torch.full_like(v, 0.1) for k, v in loc.items()}
    from robustbnn.posterior import draw_guide_samples

    post = Posterior(FC2, draw_guide_samples(loc, scale, 10, seed=1), guide={"loc": loc, "scale": scale})
    post.save(tmp_path / "vi")
    back = Posterior.load(tmp_path / "vi", n_samples=20, seed=1)
    assert back.n_samples == 20
    assert torch.equal(back.params["1.weight"][:10], post.params["1.weight"])
    assert torch.equal(back.mean().params["1.weight"][0], loc["1.weight"])


def test_load_mismatch_is_a_clear_error(tmp_path):
    Posterior(FC2, stacked(FC2, range(1))).save(tmp_path / "m")
    with pytest.raises(UserError, match="not the requested"):
        Posterior.load(tmp_path / "m", spec=dict(FC2, hidden_size=16))
    # shapes inside the file that do not match the sidecar's architecture
    import json

    info = json.loads((tmp_path / "m" / "posterior.json").read_text())
    info["spec"]["hidden_size"] = 16
    (tmp_path / "m" / "posterior.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="do not match the architecture"):
        Posterior.load(tmp_path / "m")


def test_load_corrupt_or_missing(tmp_path):
    with pytest.raises(UserError, match="no saved model"):
        Posterior.load(tmp_path / "nothing")
    Posterior(FC2, stacked(FC2, range(1))).save(tmp_path / "m")
    (tmp_path / "m" / "posterior.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        Posterior.load(tmp_path / "m")
