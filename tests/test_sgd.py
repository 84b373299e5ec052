"""Deterministic networks and ensembles: seeding, stacked training, resume."""

import pytest
import torch
from sklearn.datasets import make_moons

from robustbnn.errors import UserError
from robustbnn.inference.sgd import member_groups, train_nets

SPEC = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=16, activation="leaky")


def moons(n=600):
    x, y = make_moons(n, noise=0.1, random_state=0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def quiet(*_):
    pass


def test_ensemble_member_equals_member_trained_alone():
    x, y = moons()
    ens = train_nets(SPEC, x, y, seeds=[0, 1, 2], epochs=2, lr=0.01, batch_size=50, log=quiet)
    alone = train_nets(SPEC, x, y, seeds=[2], epochs=2, lr=0.01, batch_size=50, log=quiet)
    hist = ens.meta["history"]
    assert (ens.kind, alone.kind) == ("ensemble", "nn")
    for k in alone.params:
        torch.testing.assert_close(alone.params[k][0], ens.params[k][2], rtol=1e-5, atol=1e-6)
    assert not torch.equal(ens.params["1.weight"][0], ens.params["1.weight"][1])
    assert len(hist) == 2 * 3


def test_same_seed_same_weights_and_learns():
    x, y = moons()
    a = train_nets(SPEC, x, y, seeds=[5], epochs=5, lr=0.02, batch_size=32, log=quiet)
    b = train_nets(SPEC, x, y, seeds=[5], epochs=5, lr=0.02, batch_size=32, log=quiet)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert a.accuracy(x, y) > 95


def test_resume_equals_uninterrupted(tmp_path):
    x, y = moons()
    full = train_nets(SPEC, x, y, seeds=[0, 1], epochs=4, lr=0.01, batch_size=64, log=quiet)
    train_nets(SPEC, x, y, seeds=[0, 1], epochs=2, lr=0.01, batch_size=64, log=quiet, checkpoint=tmp_path)
    resumed = train_nets(SPEC, x, y, seeds=[0, 1], epochs=4, lr=0.01, batch_size=64, log=quiet,
                         checkpoint=tmp_path, resume=True)
    hist = resumed.meta["history"]
    assert [h["epoch"] for h in hist] == [1, 1, 2, 2, 3, 3, 4, 4]
    for k in full.params:
        torch.testing.assert_close(resumed.params[k], full.params[k])
    for other in (dict(batch_size=32), dict(lr=0.02)):  # another run's checkpoint is refused, not continued
        with pytest.raises(UserError, match="different settings"):
            train_nets(SPEC, x, y, seeds=[0, 1], epochs=4, log=quiet, checkpoint=tmp_path, resume=True,
                       **dict(dict(lr=0.01, batch_size=64), **other))


def test_member_groups_respect_budget():
    conv = dict(architecture="conv", input_shape=[1, 28, 28], num_classes=10, hidden_size=64, activation="relu")
    groups = member_groups(conv, list(range(10)), batch_size=100, budget=2**26)
    assert sum(groups, []) == list(range(10)) and len(groups) > 1


def test_resuming_an_ensemble_with_other_epochs_is_refused_not_mixed(tmp_path, monkeypatch):
    """Members of groups a checkpoint finished keep their epochs: resuming them with more (or the interrupted group
    with fewer than it ran) would mix training lengths in one ensemble under one epoch count."""
    import robustbnn.inference.sgd as sgd

    monkeypatch.setattr(sgd, "member_groups", lambda arch, seeds, *a, **k: [[s] for s in seeds])
    x, y = moons()
    kw = dict(seeds=[0, 1], lr=0.01, batch_size=64, log=quiet, checkpoint=tmp_path)
    train_nets(SPEC, x, y, epochs=2, **kw)
    for epochs in (3, 1):
        with pytest.raises(UserError, match="trained for 2 epochs; resume with --epochs 2"):
            train_nets(SPEC, x, y, epochs=epochs, resume=True, **kw)
    again = train_nets(SPEC, x, y, epochs=2, resume=True, **kw)
    assert again.meta["epochs"] == 2
