"""plot-baseline-attacks, plot-eps-attacks and plot-gradients-components on tiny half-moons models.

The models are trained through the CLI (NN, ensemble, VI BNN) or built by hand (HMC-like posteriors
whose expected gradients are known), in a temporary savedir; results are checked against
computations made here with plain modules.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from robustbnn import cli, measures, plots
from robustbnn.data import load_dataset
from robustbnn.runs import model_folder, model_settings
from robustbnn.nets import init_params, make_net
from robustbnn.posterior import Posterior

REPO = Path(__file__).resolve().parents[1]
ARCH = ["--dataset", "half_moons", "--architecture", "fc2", "--hidden_size", "8", "--activation", "leaky",
        "--epochs", "2", "--lr", "0.01"]
BNN = ARCH + ["--inference", "svi", "--train_inputs", "400"]
SPEC = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=8, activation="leaky")
# An HMC-like posterior built by hand (no training) for the gradient figures.
HMC = ["--dataset", "half_moons", "--architecture", "fc2", "--hidden_size", "8", "--activation", "leaky",
       "--inference", "hmc", "--n_samples", "100", "--warmup", "10", "--step_size", "0.001", "--num_steps", "10",
       "--train_inputs", "400"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A savedir holding a NN, a 6-member ensemble and a VI BNN of one architecture (fc2, 8 units)."""
    root = tmp_path_factory.mktemp("plots")
    save = ["--savedir", str(root), "--n_inputs", "400", "--test", "False"]
    cli.main(["train-nn", *ARCH, *save])
    cli.main(["train-ensemble", *ARCH, *save, "--ensemble_size", "6"])
    cli.main(["train-bnn", *ARCH, *save, "--inference", "svi"])
    return root


def one_line_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def png_ok(path: Path) -> None:
    assert path.exists(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # a drawn figure, not an empty canvas


def member_probs(post: Posterior, x: torch.Tensor, n: int) -> torch.Tensor:
    """Predictive probabilities of the first n samples with plain modules, one at a time."""
    net = make_net(**post.arch.builtin_spec)
    probs = []
    for s in range(n):
        net.load_state_dict({k: v[s] for k, v in post.params.items()})
        with torch.no_grad():
            probs.append(net(x).softmax(-1))
    return torch.stack(probs).mean(0)


# --------------------------------------------------------------------------------------------- baseline


def test_baseline_attacks_table_figure_and_reload(models, capsys, monkeypatch):
    out = ["--savedir", str(models), "--n_inputs", "60", "--ensemble_size", "6", "--samples_list", "1,3,6"]
    cli.main(["plot-baseline-attacks", *BNN, *out, "--format", "both", "--summary_json", str(models / "b.json")])
    csv = models / "figures" / "half_moons_baseline_attacks_fgsm.csv"
    df = pd.read_csv(csv)
    for col in ("model_type", "model", "attack_method", "attack_loss", "epsilon", "attack_samples",
                "defence_samples", "input", "label", "clean_correct", "adv_correct", "softmax_robustness"):
        assert col in df, col
    # the NN once (no duplicated rows, bug P3); the BNN attacked with 1 sample, defended with each n;
    # the ensemble attacked and defended with n members
    assert len(df) == 60 * (1 + 3 + 3)
    nn = df[df.model_type == "nn"]
    assert len(nn) == 60 and set(nn.defence_samples) == {1}
    bnn = df[df.model_type == "bnn"]
    assert set(bnn.attack_samples) == {1} and sorted(bnn.defence_samples.unique()) == [1, 3, 6]
    ens = df[df.model_type == "ensemble"]
    assert (ens.attack_samples == ens.defence_samples).all() and sorted(ens.defence_samples.unique()) == [1, 3, 6]
    assert df.softmax_robustness.between(0, 1).all() and set(df.epsilon) == {0.3}
    png_ok(csv.with_suffix(".png"))
    assert csv.with_suffix(".pdf").exists()

    # adversarial accuracy recomputed here from the saved adversarial inputs with plain modules
    data = load_dataset("half_moons")
    x, y = data.x_test[:60], data.y_test[:60]
    for kind, n in (("nn", 1), ("ensemble", 3)):
        name = nn.model.iloc[0] if kind == "nn" else ens.model.iloc[0]
        post = Posterior.load(models / name)
        x_adv = load_file(str(models / name / "attacks" / f"fgsm_predictive_eps=0.3_attackSamp={n}"
                              / "adversarial.safetensors"))["x_adv"]
        assert (x_adv - x).abs().max() <= 0.3 + 1e-6
        mine = (member_probs(post, x_adv, n).argmax(-1) == y).float().mean().item()
        rows = df[(df.model_type == kind) & (df.defence_samples == n)]
        assert rows.adv_correct.mean() == pytest.approx(mine)

    # the figure: the NN is a horizontal line at its adversarial accuracy; the other lines are the means
    captured = {}
    with monkeypatch.context() as m:
        m.setattr(plots, "save_figure", lambda fig, path, formats=("png",): captured.setdefault("fig", fig))
        plots.baseline_attacks(df, models / "check.png", "check")
    ax = captured["fig"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    nn_line = lines["deterministic NN"]
    assert len(set(nn_line.get_ydata())) == 1
    assert nn_line.get_ydata()[0] == pytest.approx(100 * nn.adv_correct.mean())
    assert list(nn_line.get_xdata()) == [0, 1]  # axes coordinates: the whole width
    ens_line = next(v for k, v in lines.items() if k.startswith("ensemble"))
    want = 100 * ens.groupby("defence_samples").adv_correct.mean()
    np.testing.assert_allclose(ens_line.get_ydata(), want.to_numpy(), rtol=1e-6)

    # --attack=False redraws from the table at the same path (bug P2)
    before = csv.read_bytes()
    csv.with_suffix(".png").unlink()
    cli.main(["plot-baseline-attacks", *BNN, *out, "--attack", "False"])
    assert csv.read_bytes() == before
    png_ok(csv.with_suffix(".png"))


def test_baseline_same_samples_and_mismatched_table(models, capsys):
    out = ["--savedir", str(models), "--n_inputs", "20", "--ensemble_size", "6", "--samples_list", "2,4"]
    cli.main(["plot-baseline-attacks", *BNN, *out, "--same_samples", "True", "--attack_method", "pgd",
              "--iterations", "3"])
    df = pd.read_csv(models / "figures" / "half_moons_baseline_attacks_pgd.csv")
    bnn = df[df.model_type == "bnn"]
    assert (bnn.attack_samples == bnn.defence_samples).all() and sorted(bnn.attack_samples.unique()) == [2, 4]
    capsys.readouterr()
    one_line_error(capsys, ["plot-baseline-attacks", *BNN, *out, "--attack_method", "pgd", "--attack", "False",
                            "--iterations", "3", "--epsilon", "0.1"], "epsilon", "--attack=True")
    one_line_error(capsys, ["plot-baseline-attacks", *BNN, *out, "--same_samples", "True", "--attack_method", "pgd",
                            "--attack", "False", "--iterations", "5"], "pgd", "--attack=True")  # made with 3


def test_baseline_errors(models, tmp_path, capsys):
    # the seed's index 8 pairs an fc2 network with a conv BNN (bug P1): refused before loading anything
    one_line_error(capsys, ["plot-baseline-attacks", "--model_idx", "8", "--savedir", str(tmp_path)],
                   "architecture", "--bnn_idx")
    one_line_error(capsys, ["plot-baseline-attacks", "--bnn_idx", "12", "--savedir", str(tmp_path)], "--bnn_idx")
    # no trained models in this savedir: the error names the command that makes them
    one_line_error(capsys, ["plot-baseline-attacks", *BNN, "--savedir", str(tmp_path), "--n_inputs", "5",
                            "--ensemble_size", "6", "--samples_list", "1,3"], "robustbnn train-")
    # no table for --attack=False
    one_line_error(capsys, ["plot-baseline-attacks", *BNN, "--savedir", str(tmp_path), "--attack", "False",
                            "--attack_method", "fgsm"], "robustbnn plot-baseline-attacks --attack=True")
    one_line_error(capsys, ["plot-baseline-attacks", *BNN, "--savedir", str(models), "--n_inputs", "5",
                            "--ensemble_size", "6", "--samples_list", "1,8"], "ensemble")


# --------------------------------------------------------------------------------------------- attack


def test_attack_files_record_their_settings(models, capsys):
    vi = BNN + ["--savedir", str(models), "--model_type", "bnn", "--n_inputs", "20"]
    pgd = ["--attack_method", "pgd", "--epsilon", "0.1"]
    for iterations in ("3", "5"):  # different PGD settings: different folders, nothing overwritten
        cli.main(["attack", *vi, *pgd, "--iterations", iterations,
                  "--summary_json", str(models / f"p{iterations}.json")])
    folders = [Path(json.loads((models / f"p{i}.json").read_text())["folder"]) for i in (3, 5)]
    assert folders[0] != folders[1] and all((f / "adversarial.safetensors").exists() for f in folders)
    assert "iter=3" in folders[0].name and "alpha=auto" in folders[0].name
    with safe_open(str(folders[0] / "adversarial.safetensors"), "pt") as f:
        saved = json.loads(f.metadata()["attack"])
    digests = saved.pop("attacker"), saved.pop("inputs")  # the weights and the inputs it was made from
    assert all(isinstance(d, str) and len(d) == 16 for d in digests)
    assert saved == dict(method="pgd", loss="predictive", eps=0.1, attack_samples=10, iterations=3, alpha=None,
                         random_start=False, pgd_legacy=False, seed=0, avg_posterior=False,
                         paper_version=measures.PAPER_VERSION)  # (the losses' gradient computation)
    # reloading (--attack=False) with other settings than the file's: one line, naming the setting
    cli.main(["attack", *vi, *pgd, "--iterations", "3", "--attack", "False"])
    capsys.readouterr()
    one_line_error(capsys, ["attack", *vi, *pgd, "--iterations", "3", "--attack", "False", "--seed", "1"],
                   "seed=0", "--attack=True")
    # avg_posterior: the VI guide's mean network; refused for any other model, saying why
    cli.main(["attack", *vi, "--avg_posterior", "True", "--summary_json", str(models / "avg.json")])
    assert json.loads((models / "avg.json").read_text())["folder"].endswith("_avgPosterior")
    capsys.readouterr()
    ens = ARCH + ["--savedir", str(models), "--model_type", "ensemble", "--ensemble_size", "6", "--n_inputs", "20",
                  "--train_inputs", "400"]
    one_line_error(capsys, ["attack", *ens, "--avg_posterior", "True"], "VI", "meaningless")
    one_line_error(capsys, ["attack", *ens, "--fresh_samples", "True"], "VI")


def test_avg_ensemble_attacks_each_member(models, capsys):
    ens = ARCH + ["--savedir", str(models), "--ensemble_size", "6", "--n_inputs", "15", "--train_inputs", "400"]
    cli.main(["attack", *ens, "--model_type", "avg_ensemble", "--summary_json", str(models / "m.json")])
    out = Path(json.loads((models / "m.json").read_text())["folder"])
    table = pd.read_csv(out / "results.csv")
    assert sorted(table.member.unique()) == list(range(6)) and len(table) == 6 * 15
    data = load_dataset("half_moons")
    post = Posterior.load(models / table.model.iloc[0])
    x_adv = load_file(str(out / "member=2" / "adversarial.safetensors"))["x_adv"]
    mine = member_probs(post.member(2), x_adv, 1).argmax(-1) == data.y_test[:15]
    assert table[table.member == 2].adv_correct.tolist() == mine.tolist()


# --------------------------------------------------------------------------------------------- eps


def test_eps_attacks_one_file_per_eps_and_samples(models, capsys):
    eps_list, counts = [0.05, 0.2], [1, 4]
    cli.main(["plot-eps-attacks", *BNN, "--savedir", str(models), "--n_inputs", "40", "--eps_list", "0.05,0.2",
              "--samples_list", "1,4"])
    csv = models / "figures" / "half_moons_increasing_eps_fgsm.csv"
    df = pd.read_csv(csv)
    assert len(df) == 40 * len(eps_list) * len(counts)
    assert {"epsilon", "samples", "adv_correct", "softmax_robustness", "clean_correct"} <= set(df.columns)
    assert (df.samples == df.attack_samples).all() and (df.samples == df.defence_samples).all()
    png_ok(csv.with_suffix(".png"))
    # one attack file per (eps, n) (bug E1: the seed overwrote them), each within its eps-ball
    folder = models / df.model.iloc[0] / "attacks"
    x = load_dataset("half_moons").x_test[:40]
    advs = {}
    for eps in eps_list:
        for n in counts:
            path = folder / f"fgsm_predictive_eps={eps}_attackSamp={n}" / "adversarial.safetensors"
            x_adv = load_file(str(path))["x_adv"]
            assert (x_adv - x).abs().max() == pytest.approx(eps, abs=1e-6)
            advs[eps, n] = x_adv
    assert not torch.equal(advs[0.05, 4], advs[0.2, 4])
    # stronger attacks do not leave more inputs correct here (FGSM on a smooth tiny model)
    acc = df.groupby(["samples", "epsilon"]).adv_correct.mean()
    for n in counts:
        assert acc[n, 0.2] <= acc[n, 0.05]
    one_line_error(capsys, ["plot-eps-attacks", *BNN, "--savedir", str(models / "nowhere"), "--attack", "False"],
                   "robustbnn plot-eps-attacks --attack=True")
    one_line_error(capsys, ["plot-eps-attacks", *BNN, "--savedir", str(models / "nowhere"), "--n_inputs", "5"],
                   "robustbnn train-bnn")


# --------------------------------------------------------------------------------------------- gradients


def hand_made_bnn(root: Path, uses_w) -> tuple[Posterior, Path]:
    """100 samples: sample s is one network w if uses_w(s), else w with a zero first layer (grad_x = 0).

    So G_S(x) = (#{s < S : uses_w(s)} / S) grad_x CE(f(x; w), y) exactly, whatever the network.
    """
    flags = dict(model_idx=0, **{a[2:]: v for a, v in zip(HMC[0::2], HMC[1::2])})
    flags.update({k: int(flags[k]) for k in ("hidden_size", "n_samples", "warmup", "num_steps")},
                 step_size=float(flags["step_size"]))
    settings = model_settings("bnn", flags, n_inputs=400)
    base = init_params(SPEC, seed=3)
    params = {k: v.unsqueeze(0).repeat(100, *[1] * v.dim()) * 2 for k, v in base.items()}
    for s in range(100):
        if not uses_w(s):
            params["1.weight"][s] = 0
    post = Posterior.from_arch(SPEC, params, kind="mcmc", meta={"dataset": "half_moons"})
    folder = model_folder(str(root), settings)
    post.save(folder)
    return post, folder


def direct_gradient(post: Posterior, n: int):
    """grad_x CE(f(x; w), y) of sample 0 with a plain module, on the first n test points."""
    data = load_dataset("half_moons")
    x, y = data.x_test[:n].clone().requires_grad_(True), data.y_test[:n]
    net = make_net(**SPEC)
    net.load_state_dict({k: v[0] for k, v in post.params.items()})
    torch.nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    return x.grad


def test_gradients_all_vanishing_match_direct_gradient(tmp_path, capsys):
    post, folder = hand_made_bnn(tmp_path, lambda s: s == 0)  # G_S = g / S: every input vanishing
    cli.main(["plot-gradients-components", *HMC, "--savedir", str(tmp_path), "--n_inputs", "30",
              "--compute_grads", "True", "--max_heatmaps", "2", "--strip_points", "40", "--format", "both",
              "--summary_json", str(tmp_path / "s.json")])
    figs = tmp_path / "figures"
    stem = folder.name
    grads = load_file(str(folder / "gradients" / "samp=1,10,50,100_inp=30.safetensors"))["grads"]
    g = direct_gradient(post, 30)
    for k, s in enumerate([1, 10, 50, 100]):
        torch.testing.assert_close(grads[k], g / s, rtol=1e-4, atol=1e-7)
    frac = pd.read_csv(figs / f"{stem}_vanishing.csv").set_index("vanishing_class")
    assert frac.fraction["vanishing"] == 1.0 and frac.fraction.sum() == pytest.approx(1.0)
    norms = pd.read_csv(figs / f"{stem}_gradNorms.csv")
    assert len(norms) == 30 * 4 and set(norms.vanishing_class) == {"vanishing"}
    np.testing.assert_allclose(norms[norms.samples == 10].linf, g.abs().amax(1).numpy() / 10, rtol=1e-4)
    comp = pd.read_csv(figs / f"{stem}_gradComponents.csv")
    assert list(comp.samples) == [1, 10, 50, 100] and (comp.n_components == 60).all()
    np.testing.assert_allclose(comp["max"], float(g.max()) / comp.samples, rtol=1e-4)
    png_ok(figs / f"{stem}_gradComponents.png")
    assert (figs / f"{stem}_gradComponents.pdf").exists()
    heat = sorted((figs / "vanishing_gradients_heatmaps").glob("*_vanGrad_*.png"))
    assert [p.name.rsplit("_", 1)[1] for p in heat] == ["0.png", "1.png"]  # the first two vanishing inputs
    for p in heat:
        png_ok(p)


def test_gradients_none_vanishing_and_loading(tmp_path, capsys):
    # ||G_1|| = |g|, ||G_10|| = |g| / 10, ||G_100|| = 0.91 |g|: every input increasing (bug G2: no crash)
    _, folder = hand_made_bnn(tmp_path, lambda s: s == 0 or s >= 10)
    common = ["plot-gradients-components", *HMC, "--savedir", str(tmp_path), "--n_inputs", "20"]
    one_line_error(capsys, common, "robustbnn loss-gradients", "--compute_grads=True")  # nothing saved yet
    cli.main(["loss-gradients", *HMC, "--savedir", str(tmp_path), "--n_inputs", "20", "--model_type", "bnn"])
    capsys.readouterr()
    # heatmaps only: loads the loss-gradients file (a superset of 1,10,100), does not force anything (G1)
    cli.main([*common, "--stripplot", "False", "--summary_json", str(tmp_path / "s.json")])
    assert "no vanishing-gradient input" in capsys.readouterr().out
    frac = pd.read_csv(tmp_path / "figures" / f"{folder.name}_vanishing.csv").set_index("vanishing_class")
    assert frac.fraction["increasing"] == 1.0
    assert not list((tmp_path / "figures").glob("**/*_vanGrad_*"))
    assert not (tmp_path / "figures" / f"{folder.name}_gradComponents.png").exists()
    one_line_error(capsys, [*common, "--samples_list", "1,500"], "holds 100")


def test_saved_gradients_of_a_retrained_model_are_not_reused(tmp_path, capsys):
    """Bug: a gradients file matched on inputs, loss and counts only, so after a retraining into the same
    model folder the figures loaded the old model's gradients."""
    hand_made_bnn(tmp_path, lambda s: s == 0)
    common = ["plot-gradients-components", *HMC, "--savedir", str(tmp_path), "--n_inputs", "20", "--stripplot",
              "False", "--heatmaps", "False"]
    cli.main([*common, "--compute_grads", "True"])
    cli.main(common)  # the same model: its file is reused
    assert "loading expected gradients" in capsys.readouterr().out
    hand_made_bnn(tmp_path, lambda s: s % 2 == 0)  # "retrained" in place
    one_line_error(capsys, common, "no saved expected gradients", "--compute_grads=True")


def test_saved_gradients_only_for_the_same_draws(tmp_path, capsys):
    """Bug: G_10 of a file for S = 1,10,50,100 (the first 10 of 100 evenly spaced draws) was reused for
    S = 1,10,50, whose first 10 of 50 evenly spaced draws are other draws."""
    post, folder = hand_made_bnn(tmp_path, lambda s: s == 0)
    cli.main(["loss-gradients", *HMC, "--savedir", str(tmp_path), "--n_inputs", "20", "--model_type", "bnn",
              "--samples_list", "1,10,50,100"])
    common = ["plot-gradients-components", *HMC, "--savedir", str(tmp_path), "--n_inputs", "20", "--stripplot",
              "False", "--heatmaps", "False"]
    one_line_error(capsys, [*common, "--samples_list", "1,10,50", "--heatmap_samples", "1,10,50"],
                   "no saved expected gradients")
    cli.main([*common, "--samples_list", "1,10", "--heatmap_samples", "1,10,100"])  # prefixes of the same draws
    assert "loading expected gradients" in capsys.readouterr().out
    [saved] = (folder / "gradients").glob("*.safetensors")
    with safe_open(str(saved), "pt") as f:
        assert json.loads(f.metadata()["gradients"])["draws"] == post.samples(100).meta["draws"]


def test_heatmap_title_follows_the_floored_classification(tmp_path, monkeypatch):
    """Bug: the title's "(vanishing)" was decided on raw norms, while the class reads norms below the floor
    (3e-8 here) as 0: norms 1e-3, 3e-11, 5e-11 are vanishing, yet the title lacked the tag."""
    from robustbnn.experiments import plot_gradients_components

    hand_made_bnn(tmp_path, lambda s: s == 0)

    def made_up(post, x, y, counts, folder, args, tol):
        g = torch.zeros(len(counts), len(x), 2)
        g[:, :, 0] = torch.tensor([1e-3, 3e-11, 5e-11])[:, None]
        return g, {}

    titles = []

    def keep_title(fig, path, formats=("png",)):
        titles.append(fig.get_suptitle())
        plots.plt.close(fig)
        return []

    monkeypatch.setattr(plot_gradients_components, "gradients", made_up)
    monkeypatch.setattr(plots, "save_figure", keep_title)
    cli.main(["plot-gradients-components", *HMC, "--savedir", str(tmp_path), "--n_inputs", "3", "--stripplot",
              "False", "--samples_list", "1,10,100", "--max_heatmaps", "1"])
    assert len(titles) == 1 and "(vanishing)" in titles[0], titles


def test_readme_figure_command_runs_as_written(tmp_path, monkeypatch):
    """The seed README's Figure 2/3 command (with --device=auto), on a tiny model and savedir."""
    hand_made_bnn(tmp_path, lambda s: s % 3 == 0)
    argv = ["plot_gradients_components.py", "--n_inputs=10", "--model_idx=0", "--compute_grads=True",
            "--device=auto", "--stripplot=True", "--heatmaps=True", f"--savedir={tmp_path}", *HMC]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "plot_gradients_components.py"), run_name="__main__")
    assert list((tmp_path / "figures").glob("*_gradComponents.png"))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (4, 5, 6, 7)])  # vectors: the half-moons runs
def test_heatmap_any_input_shape(tmp_path, shape):
    """Bug G3: the heatmaps took 2-D images only."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen)
    g = torch.randn((3, *shape), generator=gen)
    [path] = plots.vanishing_heatmap(x, g, [1, 10, 100], tmp_path / "h.png", label=3, index=7)
    assert path.exists() and path.stat().st_size > 5_000


def test_strip_subsample_is_paired_and_seeded():
    from robustbnn.experiments.plot_gradients_components import strip_subsample

    grads = torch.arange(3 * 50 * 4, dtype=torch.float32).reshape(3, 50, 4)
    a = strip_subsample(grads, [1, 10, 100], 30, seed=1)
    b = strip_subsample(grads, [1, 10, 100], 30, seed=1)
    assert all(np.array_equal(a[s], b[s]) for s in a) and len(a[1]) == 30
    # the same component positions for every S (values differ by exactly 200 between consecutive S here)
    np.testing.assert_array_equal(a[10] - a[1], 200.0)
    assert len(strip_subsample(grads, [1, 10, 100], 10_000, seed=1)[1]) == 200
