"""bfloat16 gradients for SGHMC (--grad_dtype bfloat16): close to float32 ones, and the same learning."""

import json

import pytest
import torch

from robustbnn.errors import UserError
from robustbnn.inference.mlp_grad import grad_dtype, mlp_plan, nll_and_grad
from robustbnn.inference.sghmc import bnn_minibatch_grad, run_sghmc
from robustbnn.nets import init_params, template
from robustbnn.forward import flatten, param_layout

BF16 = torch.bfloat16


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def mlp_case(chains=3, n=400, d=20, width=32, classes=5, seed=0):
    spec = dict(architecture="fc2", input_shape=(d,), num_classes=classes, hidden_size=width, activation="leaky")
    layout = param_layout(init_params(spec, 0))
    q = torch.stack([flatten(init_params(spec, seed + c), layout) for c in range(chains)])
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=gen), torch.randint(classes, (n,), generator=gen)
    return spec, layout, q, x, y


def test_bfloat16_likelihood_gradient_is_close_to_float32():
    """Relative error of the whole gradient a few times 2^-8 (2% here; < 5%), for shared inputs with a mask
    and for per-chain batches; the value-only call gives float32's value and no gradient."""
    spec, layout, q, x, y = mlp_case()
    plan = mlp_plan(template(spec), layout, x.shape[1:])
    mask = (torch.arange(len(x)) < 300).float()
    nll32, g32 = nll_and_grad(plan, q, x, y, mask, scale=3.0)
    nll16, g16 = nll_and_grad(plan, q, x.to(BF16), y, mask, scale=3.0, dtype=BF16)
    assert g16.dtype == torch.float32 and g16.shape == g32.shape
    assert relative_error(g16, g32) < 0.05
    assert relative_error(nll16, nll32) < 0.05
    value, none = nll_and_grad(plan, q, x, y, mask, grad=False)
    assert none is None and torch.equal(value, nll32)
    idx = torch.stack([torch.randperm(len(x), generator=torch.Generator().manual_seed(c))[:64] for c in range(3)])
    _, h32 = nll_and_grad(plan, q, x[idx], y[idx])
    _, h16 = nll_and_grad(plan, q, x[idx], y[idx], dtype=BF16)  # float32 inputs are cast
    assert relative_error(h16, h32) < 0.05


def test_bfloat16_minibatch_gradient_for_perceptrons_and_other_networks():
    """SGHMC's minibatch gradient in bfloat16 (hand-written for perceptrons, autocast for a conv net) against
    float32, prior included."""
    spec, layout, q, x, y = mlp_case()
    conv = dict(architecture="conv", input_shape=(1, 16, 16), num_classes=3, hidden_size=4, activation="relu")
    layout = param_layout(init_params(conv, 0))
    qc = torch.stack([flatten(init_params(conv, c), layout) for c in range(2)])
    gen = torch.Generator().manual_seed(1)
    xc, yc = torch.rand(30, 1, 16, 16, generator=gen), torch.randint(3, (30,), generator=gen)
    idx = torch.stack([torch.arange(10), torch.arange(10, 20)])
    # the conv net runs under autocast with its activations in bfloat16 (every sample in one convolution per
    # layer), the perceptron's hand-written gradient keeps float32 activations: 5.5% and under 5% here
    for arch, qq, xx, yy, tol in ((spec, q[:2], x, y, 0.05), (conv, qc, xc, yc, 0.08)):
        g32 = bnn_minibatch_grad(arch, xx, yy, prior_scale=0.5)(qq, idx)
        g16 = bnn_minibatch_grad(arch, xx, yy, prior_scale=0.5, dtype=BF16)(qq, idx)
        assert g16.dtype == torch.float32 and relative_error(g16, g32) < tol


def test_bfloat16_sghmc_run_and_bad_dtype():
    """SGHMC with bfloat16 gradients learns as the float32 run does; unknown dtypes are one-line errors."""
    from tests.test_sghmc import moons

    data, arch = moons()
    acc = {}
    for name in ("float32", "bfloat16"):
        post = run_sghmc(arch, data.x_train, data.y_train, cycles=4, burnin_cycles=1, epochs_per_cycle=20, lr=0.05,
                         batch_size=50, num_chains=2, grad_dtype=name, x_eval=data.x_test[:50], log=lambda *_: None)
        assert post.meta["sghmc"]["grad_dtype"] == name and post.n_samples == 3 * 2
        acc[name] = post.accuracy(data.x_test, data.y_test)
    assert acc["float32"] > 80 and abs(acc["bfloat16"] - acc["float32"]) < 5, acc
    with pytest.raises(UserError, match="grad_dtype must be one of float32, bfloat16"):
        grad_dtype("float16")
    with pytest.raises(UserError, match="grad_dtype"):
        run_sghmc(arch, data.x_train, data.y_train, cycles=2, burnin_cycles=0, batch_size=50, grad_dtype="half",
                  log=lambda *_: None)


def test_grad_dtype_names_the_model_folder_and_older_records_are_reused(tmp_path):
    """A bfloat16 sampler gets its own folder (its draws differ), HMC refuses the flag; a study record written
    before the flag existed still matches the same settings at the flag's default."""
    from robustbnn import study
    from robustbnn.runs import model_folder, model_settings

    flags = dict(model_idx=1, inference="sghmc", grad_dtype="bfloat16")
    s16 = model_settings("bnn", flags, n_inputs=60000)
    s32 = model_settings("bnn", dict(flags, grad_dtype="float32"), n_inputs=60000)
    assert model_folder(str(tmp_path), s16).name == model_folder(str(tmp_path), s32).name + "_grad=bfloat16"
    with pytest.raises(UserError, match="is for --inference sghmc"):
        model_settings("bnn", dict(flags, inference="hmc"), n_inputs=60000)
    old = {k: v for k, v in s32.items() if k not in ("grad_dtype", "init_from")}  # written before these flags
    path = tmp_path / "step.json"
    path.write_text(json.dumps({"settings": {"model": old, "seed": 0}, "result": {"v": 1}, "time_s": 0.0}))
    steps = study.Steps(1, "mnist", log=lambda *_: None)
    record, reused = steps.run(path, {"model": s32, "seed": 0}, "train", "mcmc", compute=lambda: {"v": 2})
    assert reused and record["result"] == {"v": 1}
    record, reused = steps.run(path, {"model": s16, "seed": 0}, "train", "mcmc", compute=lambda: 2)
    assert not reused and record["result"] == 2
