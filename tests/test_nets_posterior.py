"""Architectures and the Posterior: shapes, vectorised predictions, chunking, save/load."""

import math

import pytest
import torch

from robustbnn.errors import UserError
from robustbnn.nets import init_params, make_net
from robustbnn.forward import log_mean_softmax
from robustbnn.guide import MeanFieldGuide
from robustbnn.posterior import Posterior
from robustbnn.storage import load

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


@pytest.mark.parametrize("side", [14, 15])
def test_conv_rejects_inputs_below_16(side):
    # 14 -> 10 -> 5 -> 1 -> 0: a 0-sized map would be a raw RuntimeError in the forward
    with pytest.raises(UserError, match="at least 16x16"):
        make_net("conv", [1, side, side], 10, 8, "relu")
    assert make_net("conv", [1, 16, 16], 10, 8, "relu")(torch.rand(1, 1, 16, 16)).shape == (1, 10)


def test_init_params_seeded():
    a, b, c = init_params(FC2, 3), init_params(FC2, 3), init_params(FC2, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])


def make(spec, n, kind="ensemble", **meta):
    return Posterior.from_arch(spec, stacked(spec, range(n)), kind=kind, meta=meta)


def test_vectorised_logits_equal_per_sample_loop():
    params = stacked(CONV, range(3))
    post = Posterior.from_arch(CONV, params, kind="ensemble")
    x = torch.rand(5, 1, 28, 28)
    net = make_net(**CONV)
    for s in range(3):
        net.load_state_dict({k: v[s] for k, v in params.items()})
        torch.testing.assert_close(post.logits(x)[s], net(x), rtol=1e-5, atol=1e-5)


def test_mlp_fast_path_equals_vmap_path():
    from torch.func import functional_call, vmap

    from robustbnn.forward import stacked_logits

    post = make(dict(FC2, input_shape=[1, 3, 3], hidden_size=5), 4)
    x = torch.rand(6, 1, 3, 3)
    slow = vmap(lambda p, xb: functional_call(post.net, p, (xb,)), in_dims=(0, None))(post.params, x)
    torch.testing.assert_close(stacked_logits(post.net, post.params, x), slow, rtol=1e-5, atol=1e-6)


def test_predictive_is_mean_of_softmax_and_chunking_is_exact():
    post = make(FC2, 7)
    x = torch.rand(33, 2)
    logits = post.logits(x)
    expected = torch.softmax(logits, -1).mean(0)
    torch.testing.assert_close(post.predictive(x), expected)
    tiny = post.logits(x, budget=40)  # forces many sample and input chunks
    assert post.chunks(x, budget=40) != post.chunks(x)
    torch.testing.assert_close(tiny, logits)


def test_log_mean_softmax_is_stable():
    logits = torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]])
    out = log_mean_softmax(logits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp(), torch.tensor([[0.5, 0.5]]))
    assert math.isclose(out[0, 0].item(), math.log(0.5), rel_tol=1e-6)


def test_take_prefix_and_too_many_samples():
    post = make(FC2, 4)
    assert post.take(2).n_samples == 2
    assert torch.equal(post.take(2).params["1.weight"], post.params["1.weight"][:2])
    with pytest.raises(UserError, match="holds 4"):
        post.take(5)


def test_member_out_of_range_is_a_user_error_and_as_module_leaves_the_posterior_alone():
    post = make(FC2, 3)
    assert torch.equal(post.member(2).params["1.weight"][0], post.params["1.weight"][2])
    for k in (3, -1):
        with pytest.raises(UserError, match="holds samples 0 to 2"):
            post.member(k)
    module = post.as_module()
    module.train()
    assert not post.net.training  # an attack library's .train() or .half() on the module


def test_init_params_does_not_reseed_the_gpus(monkeypatch):
    """torch.manual_seed reseeds every GPU too, which fork_rng(devices=[]) does not restore."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    init_params(FC2, 3)
    assert calls == []


def test_posterior_is_a_value():
    post = make(FC2, 3, note=[1])
    other = post.take(2)
    assert "tensor" not in repr(post) and "ensemble" in repr(post)
    assert post != make(FC2, 3) and post == post  # identity, never an elementwise tensor comparison
    other.meta["note"].append(2)  # meta is copied, not shared
    assert post.meta["note"] == [1]
    assert post.take(None) is not post


def test_kind_is_a_field_and_checked():
    assert make(FC2, 1, kind="mcmc").kind == "mcmc"
    with pytest.raises(UserError, match="unknown posterior kind"):
        make(FC2, 1, kind="hmc")


def test_mean_network_is_for_vi_guides_only():
    with pytest.raises(UserError, match="VI guides only"):
        make(FC2, 3, kind="mcmc").mean()
    loc = init_params(FC2, 0)
    guide = MeanFieldGuide(make_net(**FC2), loc, {k: torch.full_like(v, 0.1) for k, v in loc.items()})
    mean = guide.mean()
    assert mean.kind == "nn" and mean.n_samples == 1  # legacy evaluation then uses logits, as the paper did
    assert torch.equal(mean.params["1.weight"][0], loc["1.weight"])


def test_save_load_bit_identical_one_file(tmp_path):
    post = make(CONV, 2, kind="ensemble", dataset="mnist")
    post.save(tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["posterior.safetensors"]
    back = Posterior.load(tmp_path / "m", arch=CONV)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(back.logits(x), post.logits(x))
    assert back.kind == "ensemble" and back.meta["dataset"] == "mnist" and back.input_shape == (1, 28, 28)


def test_guide_saved_and_loaded_as_a_guide(tmp_path):
    loc = init_params(FC2, 0)
    scale = {k: torch.full_like(v, 0.1) for k, v in loc.items()}
    arch = Posterior.from_arch(FC2, stacked(FC2, [0])).arch
    guide = MeanFieldGuide(make_net(**FC2), loc, scale, {"n_samples": 10}, arch)
    first = guide.draw(10, seed=1)
    guide.save(tmp_path / "vi")
    back = load(tmp_path / "vi")
    assert isinstance(back, MeanFieldGuide)  # load returns what is stored: no hidden sampling
    more = back.draw(20, seed=1)
    assert more.kind == "vi" and more.n_samples == 20
    assert torch.equal(more.params["1.weight"][:10], first.params["1.weight"])  # nested, seeded draws
    assert back.samples(None).n_samples == 10
    assert not torch.equal(back.draw(10, seed=2).params["1.weight"], first.params["1.weight"])


def test_load_mismatch_is_a_clear_error(tmp_path):
    make(FC2, 1, kind="nn").save(tmp_path / "m")
    with pytest.raises(UserError, match="not the requested"):
        Posterior.load(tmp_path / "m", arch=dict(FC2, hidden_size=16))


def _rewrite_metadata(path, change):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        record = json.loads(f.metadata()["robustbnn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(record)
    save_file(tensors, str(path), metadata={"robustbnn": json.dumps(record)})


def test_saved_architecture_that_does_not_fit_the_weights(tmp_path):
    make(FC2, 1, kind="nn").save(tmp_path / "m")
    _rewrite_metadata(tmp_path / "m" / "posterior.safetensors", lambda r: r["arch"]["kwargs"].update(hidden_size=16))
    with pytest.raises(UserError, match="do not match the architecture") as err:
        Posterior.load(tmp_path / "m")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change", [
    lambda r: r.update(kind=7),
    lambda r: r.update(meta="not a dict"),
    lambda r: r.update(input_shape="2"),
    lambda r: r.pop("arch"),
])
def test_metadata_with_wrong_types_is_one_line(tmp_path, change):
    make(FC2, 1, kind="nn").save(tmp_path / "m")
    _rewrite_metadata(tmp_path / "m" / "posterior.safetensors", change)
    with pytest.raises(UserError, match="wrong-typed") as err:
        Posterior.load(tmp_path / "m")
    assert "\n" not in str(err.value)


def test_load_corrupt_or_missing(tmp_path):
    with pytest.raises(UserError, match="no saved model"):
        Posterior.load(tmp_path / "nothing")
    make(FC2, 1, kind="nn").save(tmp_path / "m")
    (tmp_path / "m" / "posterior.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        Posterior.load(tmp_path / "m")


def test_templates_leave_the_global_random_state_alone(tmp_path):
    make(FC2, 2).save(tmp_path / "m")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    make(CONV, 1)
    Posterior.load(tmp_path / "m")
    assert torch.equal(torch.get_rng_state(), before)
