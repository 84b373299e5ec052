"""`robustbnn study` on a tiny configuration: the verdict table, reuse, resume after an interruption, bad input."""

import json
import re

import pandas as pd
import pytest
import torch

from robustbnn import verdict as battery
from robustbnn import measures, runs, study
from robustbnn.data import Dataset
from robustbnn.errors import UserError
from robustbnn.storage import WEIGHTS_FILE
from tests.conftest import run_cli
from tests.test_cli import one_line_error

# The paper's double softmax bounds its softmax robustness of a BNN from below: max_k |.| <= (e - 1) / (e + C - 1).
LEGACY_FLOOR = 1 - (torch.e - 1) / (torch.e + 10 - 1)


def synthetic(n_train: int = 300, n_test: int = 100, seed: int = 0) -> Dataset:
    """10 classes of 8x8 images in [0, 1]: a prototype per class plus noise (learnable in one epoch)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 8, 8, generator=g)

    def draw(n):
        y = torch.arange(n) % 10
        return (protos[y] + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), y

    return Dataset("mnist", *draw(n_train), *draw(n_test), (1, 8, 8), 10)


def tiny_spec(ensemble_epochs: int = 3) -> dict:
    """The MNIST cpu spec, shrunk: narrow nets, 3 epochs, 4 kept SGHMC cycles of 2 chains, 50 test points, one eps."""
    spec = study.study_spec("mnist", "cpu")
    m = spec["models"]
    small = dict(hidden_size=16, epochs=3)
    spec["models"] = {"nn": dict(m["nn"], **small), "ensemble": dict(m["ensemble"], **small, ensemble_size=3),
                      "vi": dict(m["vi"], **small),
                      "mcmc": dict(m["mcmc"], hidden_size=16, num_chains=2, cycles=5, burnin_cycles=1,
                                   epochs_per_cycle=2, batch_size=100)}
    spec["models"]["ensemble"]["epochs"] = ensemble_epochs
    spec.update(n_train=300, n_test=50, samples=4, eps=[0.1], battery=dict(iterations=5, square_queries=20))
    return spec


def run(spec, savedir, **kw):
    lines = []
    res = study.run_study(spec, savedir, "cpu", data=synthetic(), log=lines.append, **kw)
    return res, lines


def posterior_stamps(savedir) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (savedir / "models").glob(f"*/{WEIGHTS_FILE}")}


def test_study_writes_the_table_and_a_rerun_reuses_everything(tmp_path, monkeypatch, one_thread):
    res, lines = run(tiny_spec(), tmp_path)
    out = tmp_path / "mnist_cpu"
    assert res["folder"] == str(out) and len(lines) == 4 * 4
    assert lines[0] == "[1/16] mnist nn: train ..." and "battery eps=0.1" in lines[2]
    table = pd.read_csv(out / "table.csv")
    assert table.model.tolist() == ["nn", "ensemble", "vi", "mcmc"]
    assert table.inference.tolist() == ["adam", "adam x3", "vi", "sghmc"]
    accs = [c for c in table if "acc" in c]
    assert len(accs) == 4 and table[accs].notna().all().all()
    assert ((table[accs] >= 0) & (table[accs] <= 100)).all().all()
    assert (table.clean_acc > 30).all(), "every model learned the synthetic classes"
    # the battery counts a misclassified input as broken, so robust accuracy never exceeds clean accuracy
    assert (table["robust_acc_eps=0.1"] <= table.clean_acc).all()
    for c in ("softmax_rob_eps=0.1", "paper_legacy_rob_eps=0.1"):
        assert table[c].between(0, 1).all()
    bnn = table.model.isin(["vi", "mcmc"])
    assert (table.loc[bnn, "paper_legacy_rob_eps=0.1"] >= LEGACY_FLOOR - 1e-6).all(), "the double-softmax floor"
    assert table.loc[table.model == "mcmc", ["loglik_rhat", "weight_norm_rhat_max"]].notna().all().all()
    assert table.loc[table.model != "mcmc", "loglik_rhat"].isna().all()
    assert table.masking_flags.notna().all()
    everything = json.loads((out / "study.json").read_text())
    for m in table.model:
        r = everything["results"][m]["battery_eps=0.1"]["result"]
        assert r["robust_acc"] <= min(r[f"acc_after_{a}"] for a in battery.DEFAULT_BATTERY) + 1e-9
        assert everything["results"][m]["train"]["time_s"] >= 0
    assert len(everything["timings"]) == 16 and everything["settings"]["battery"]["iterations"] == 5
    md = (out / "table.md").read_text()
    assert "deviate from the paper" in md and "| mcmc | sghmc |" in md

    # a second run trains nothing and computes nothing
    stamps, results = posterior_stamps(tmp_path), {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*")}
    assert len(stamps) == 4
    res2, lines2 = run(tiny_spec(), tmp_path)
    assert all(line.endswith("(done before, reused)") for line in lines2), lines2
    assert posterior_stamps(tmp_path) == stamps
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*")} == results
    pd.testing.assert_frame_equal(pd.read_csv(out / "table.csv"), table)

    # other evaluation settings redo the evaluations, not the training
    spec = tiny_spec()
    spec["n_test"] = 40
    _, lines3 = run(spec, tmp_path)
    assert lines3[0].endswith("(done before, reused)") and lines3[1].endswith("...")
    assert posterior_stamps(tmp_path) == stamps

    # a newer paper's evaluation redoes its steps and the flags (which read it), not the battery; a run of one model
    # keeps the others' rows, blank where they were evaluated otherwise (here: by the older paper's evaluation)
    monkeypatch.setattr(measures, "PAPER_VERSION", measures.PAPER_VERSION + 1)
    spec["models"] = {"mcmc": spec["models"]["mcmc"]}
    _, lines4 = run(spec, tmp_path)
    assert [line.endswith("(done before, reused)") for line in lines4] == [True, False, True, False], lines4
    table4 = pd.read_csv(out / "table.csv")
    assert table4.model.tolist() == ["nn", "ensemble", "vi", "mcmc"]
    assert table4[accs].notna().all(axis=1).tolist() == [False, False, False, True]
    assert (table4.clean_acc.isna() == [True, True, True, False]).all()
    assert table4["robust_acc_eps=0.1"].notna().all()
    assert "- nn: " in (out / "table.md").read_text()


def test_eps_labels_name_one_eps_each():
    assert study._eps_label(0.1) == "eps=0.1" and study._eps_label(0.3) == "eps=0.3"
    assert study._eps_label(8 / 255) != study._eps_label(0.0313725)


def test_interrupted_study_resumes_without_retraining(tmp_path, monkeypatch, one_thread):
    """Interrupted in the ensemble's second epoch: the network is kept, the ensemble resumes from its checkpoint."""
    import robustbnn.inference.sgd as sgd

    save = sgd.save_checkpoint
    saves = []

    def save_then_interrupt(folder, state):
        save(folder, state)
        saves.append(folder)
        if "ensemble" in str(folder):
            raise KeyboardInterrupt

    monkeypatch.setattr(sgd, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_spec(ensemble_epochs=2), tmp_path)
    out = tmp_path / "mnist_cpu"
    assert pd.read_csv(out / "table.csv").model.tolist() == ["nn"], "the table is written after every model"
    stamps = posterior_stamps(tmp_path)
    assert list(stamps) == [p.parent.name for p in (tmp_path / "models").glob("*nn*/posterior.safetensors")]
    monkeypatch.setattr(sgd, "save_checkpoint", save)

    resumed = {}
    train_model = runs.train_model

    def spy(settings, *args, **kw):
        resumed[settings["model_type"] if settings["model_type"] != "bnn" else settings["inference"]] = kw["resume"]
        return train_model(settings, *args, **kw)

    monkeypatch.setattr(runs, "train_model", spy)
    _, lines = run(tiny_spec(ensemble_epochs=2), tmp_path)
    assert all(line.endswith("(done before, reused)") for line in lines[:4]), lines[:4]
    assert resumed == {"ensemble": True, "vi": False, "sghmc": False}, "only the interrupted training resumes"
    assert {k: v for k, v in posterior_stamps(tmp_path).items() if k in stamps} == stamps
    history = pd.read_csv(next((tmp_path / "models").glob("*ensemble*")) / "history.csv")
    assert sorted(history.epoch.unique()) == [1, 2]
    assert pd.read_csv(out / "table.csv").model.tolist() == ["nn", "ensemble", "vi", "mcmc"]


def test_a_model_with_other_settings_is_not_reused_silently(tmp_path, one_thread):
    spec = tiny_spec()
    spec["models"] = {"nn": spec["models"]["nn"]}
    run(spec, tmp_path)
    with pytest.raises(study.UserError, match="other settings \\(seed=0, not 1\\).*--retrain"):
        study.run_study(spec, tmp_path, "cpu", data=synthetic(), log=lambda _: None, seed=1)


def test_corrupt_result_files_are_redone_or_one_line(tmp_path, one_thread):
    """A step record that is not an object, or whose result is missing, runs again; a reused record whose result
    has the wrong shape stops the table with one line naming the folder."""
    spec = tiny_spec()
    spec["models"] = {"nn": spec["models"]["nn"]}
    run(spec, tmp_path)
    results = tmp_path / "mnist_cpu" / "results" / "nn"
    (results / "paper_eps=0.1.json").write_text("[1, 2]")
    battery_file = results / "battery_eps=0.1.json"
    record = json.loads(battery_file.read_text())
    battery_file.write_text(json.dumps({"settings": record["settings"]}))
    _, lines = run(spec, tmp_path)
    assert lines[1].endswith("...") and lines[2].endswith("..."), lines  # both steps ran again
    assert json.loads(battery_file.read_text())["result"]["robust_acc"] == record["result"]["robust_acc"]
    battery_file.write_text(json.dumps(dict(record, result={"clean_acc": 1.0})))
    with pytest.raises(study.UserError, match="malformed") as info:
        run(spec, tmp_path)
    assert "\n" not in str(info.value) and str(results) in str(info.value)


def test_correct_evaluation_is_the_battery(one_thread):
    """The study's worst-case loop gives `evaluate.evaluate`'s robust accuracy, attack by attack."""
    from robustbnn import train_nets

    data = synthetic()
    spec = dict(architecture="fc2", input_shape=[1, 8, 8], num_classes=10, hidden_size=16, activation="leaky")
    post = train_nets(spec, data.x_train, data.y_train, seeds=[0, 1], epochs=1, lr=0.01, batch_size=64,
                      log=lambda *_: None)
    x, y, s = data.x_test[:60], data.y_test[:60], battery.Settings(iterations=5, square_queries=20)
    mine, frame = study.correct_evaluation(post, x, y, 0.1, s, (0.0, 1.0))
    theirs = battery.evaluate(post, x, y, [0.1], s, legacy=False, flags=False)["summary"].iloc[0]
    s = s.for_model(post)
    assert s.attacks == battery.DEFAULT_BATTERY
    for k in ("clean_acc", "robust_acc", "effort_rounds_run", *(f"acc_after_{a}" for a in s.attacks)):
        assert mine[k] == pytest.approx(theirs[k]), k
    effort = {battery.effort_label(a, k) for a in battery.APGD_ATTACKS for k in range(1, s.effort_rounds + 1)}
    assert 0 <= mine["softmax_robustness"] <= 1 and set(frame.attack) <= {"clean", *s.attacks, *effort}


def test_the_paper_evaluation_is_the_one_of_evaluate(one_thread):
    """The study and `verdict.evaluate` run the same paper's evaluation (`measures.paper_evaluation`): the same
    numbers, and the legacy softmax robustness is the double softmax of `measures.legacy_softmax_robustness`."""
    from robustbnn import attacks, measures, train_nets

    data = synthetic()
    spec = dict(architecture="fc2", input_shape=[1, 8, 8], num_classes=10, hidden_size=16, activation="leaky")
    post = train_nets(spec, data.x_train, data.y_train, seeds=[0, 1], epochs=1, lr=0.01, batch_size=64,
                      log=lambda *_: None)
    x, y = data.x_test[:40], data.y_test[:40]
    paper = measures.paper_evaluation(post, x, y, 0.1)
    row = battery.evaluate(post, x, y, [0.1], battery.Settings(("fgsm",), effort_rounds=0), flags=False)["summary"]
    assert (row.legacy_fgsm_acc[0], row.legacy_pgd_acc[0], row.legacy_softmax_robustness[0]) == (
        paper["fgsm"]["adv_acc"], paper["pgd"]["adv_acc"], paper["pgd"]["legacy_softmax_robustness"])
    x_pgd = attacks.pgd(post, x, y, 0.1, loss="legacy", legacy=True)
    out = [attacks.legacy_out_of_logits(post, post.logits(z)) for z in (x, x_pgd)]
    assert paper["pgd"]["legacy_softmax_robustness"] == measures.legacy_softmax_robustness(*out).mean().item()
    assert paper["pgd"]["adv_acc"] == 100.0 * (post.log_predictive(x_pgd).argmax(-1) == y).float().mean().item()


def test_specs_cover_both_datasets_and_scales():
    for dataset in ("mnist", "fashion_mnist"):
        names = {}
        for scale in ("cpu", "paper"):
            spec = study.study_spec(dataset, scale)
            assert list(spec["models"]) == list(study.MODELS) and spec["n_train"] == 60000
            assert spec["eps"] == [0.1, 0.3] and spec["deviations"]
            assert (spec["n_test"], spec["samples"]) == ((1000, 20) if scale == "cpu" else (10000, 100))
            settings = {m: study.model_settings(sm, 60000) for m, sm in spec["models"].items()}
            assert all(s["dataset"] == dataset for s in settings.values())
            assert settings["mcmc"]["inference"] == ("sghmc" if scale == "cpu" else "hmc")
            assert settings["vi"]["architecture"] == ("fc2" if scale == "cpu" else "conv")
            assert settings["ensemble"]["ensemble_size"] == 10
            names[scale] = {m: runs.model_folder("x", s).name for m, s in settings.items()}
        # MNIST: the same network and ensemble at both scales, trained once and shared; Fashion-MNIST's cpu
        # scale trains its networks 5 epochs (the ensemble's folder name has no epochs: the config check guards)
        shared = [True, True, False, False] if dataset == "mnist" else [False, True, False, False]
        assert [names["cpu"][m] == names["paper"][m] for m in study.MODELS] == shared
    assert list(study.study_spec("mnist", models=["vi", "nn"])["models"]) == ["nn", "vi"]


def test_missing_data_is_one_line_and_writes_nothing(tmp_path, capsys):
    code, _, err = run_cli(["study", "--dataset", "fashion_mnist", "--data_dir", tmp_path / "empty",
                            "--savedir", tmp_path / "out"], capsys)
    assert "robustbnn fetch-data fashion_mnist" in one_line_error(code, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,needle", [(["--models", "nn,cnn"], "subset of nn,ensemble,vi,mcmc"),
                                          (["--scale", "huge"], "invalid choice"),
                                          (["--n_test", "0"], "positive integer")])
def test_bad_flags_are_one_line(flags, needle, capsys):
    code, _, err = run_cli(["study", *flags], capsys)
    assert needle in one_line_error(code, err)


def test_help_says_what_the_scales_mean(capsys):
    code, out, _ = run_cli(["study", "--help"], capsys)
    out = " ".join(out.split())  # argparse wraps the help text
    assert code == 0 and "cpu:" in out and "paper:" in out
    # what each scale trains and evaluates; run times are measurements of one machine, kept in docs/study.md
    for needle in ("60000 training points", "SGHMC instead of", "first 1000 test points", "20 posterior samples",
                   "the whole test set and 100 samples", "docs/study.md"):
        assert needle in out, needle
    assert not re.search(r"\b(minutes|hours)\b", out)


def test_real_mnist_slice(real_data_root, tmp_path, one_thread):
    if not (real_data_root / "mnist").exists():
        pytest.skip(f"no mnist in {real_data_root}; run: robustbnn fetch-data mnist")
    spec = tiny_spec()
    spec["models"] = {"nn": dict(spec["models"]["nn"], hidden_size=32)}
    res = study.run_study(spec, tmp_path, "cpu", data_dir=real_data_root, log=lambda _: None)
    row = res["rows"][0]
    assert row["model"] == "nn" and row["clean_acc"] > 60 and row["robust_acc_eps=0.1"] <= row["clean_acc"]


def test_the_command_on_a_real_mnist_slice(real_data_root, tmp_path, capsys, monkeypatch, one_thread):
    """The command end to end, with the MNIST cpu spec shrunk in place (the network only)."""
    if not (real_data_root / "mnist").exists():
        pytest.skip(f"no mnist in {real_data_root}; run: robustbnn fetch-data mnist")
    spec = tiny_spec()
    spec["models"]["nn"]["hidden_size"] = 32
    monkeypatch.setitem(study.STUDY["mnist"], "cpu", {k: v for k, v in spec.items() if k not in ("dataset", "scale")})
    args = ["study", "--models", "nn", "--data_dir", real_data_root, "--savedir", tmp_path,
            "--summary_json", tmp_path / "s.json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "verdict table:" in out
    assert "[1/4] mnist nn: train ..." in err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["markdown"] == str(tmp_path / "mnist_cpu" / "table.md")
    acc = summary["robust_acc"]["nn"]
    assert 0 <= acc["robust_acc_eps=0.1"] <= 100 and 0 <= acc["paper_pgd_acc_eps=0.1"] <= 100
    code, _, err = run_cli(args, capsys)
    assert code == 0 and err.count("(done before, reused)") == 4


def test_an_extended_mcmc_model_trains_the_run_it_extends_first(tmp_path, one_thread):
    """A study model with `extends` continues the chains of the run those overrides give: that run is trained
    (or reused) first, in the same models folder, and the table's model starts at its chains' last draws."""
    spec = tiny_spec()
    spec["models"] = {"mcmc": dict(spec["models"]["mcmc"], cycles=2, burnin_cycles=1,
                                   extends=dict(cycles=3, burnin_cycles=1))}
    spec["samples"] = 2  # the draws it keeps (more is an error, not fewer in silence)
    res, lines = run(spec, tmp_path)
    folders = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert len(folders) == 2 and sum("_from=" in f for f in folders) == 1
    first = next(f for f in folders if "_from=" not in f)
    assert "cycles=3x2ep" in first
    settings = study.model_settings(spec["models"]["mcmc"], spec["n_train"])
    assert settings["init_from"] == first and settings["cycles"] == 2
    assert pd.read_csv(tmp_path / "mnist_cpu" / "table.csv").model.tolist() == ["mcmc"]
    _, again = run(spec, tmp_path)
    assert all(line.endswith("(done before, reused)") for line in again), again
    spec["samples"] = 4
    with pytest.raises(UserError, match="holds 2"):
        run(spec, tmp_path)


def test_a_row_kept_from_an_earlier_run_lists_its_preset_keys(tmp_path):
    """table.md lists a model this run did not ask for by its preset's keys where it was trained from the preset,
    as it lists this run's models, and by every stored setting where it was trained otherwise."""
    spec = study.study_spec("mnist", models=["mcmc"])
    preset = study.STUDY["mnist"]["cpu"]["models"]["nn"]
    for name, model in (("nn", study.model_settings(preset, spec["n_train"])),
                        ("ensemble", dict(study.model_settings(preset, spec["n_train"]), hidden_size=32))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.json").write_text(json.dumps({"settings": {"model": model}}))
    assert study.listed_settings("nn", spec, tmp_path / "nn") == preset
    listed = study.listed_settings("ensemble", spec, tmp_path / "ensemble")
    assert listed["hidden_size"] == 32 and listed["dataset"] == "mnist"
    assert study.listed_settings("mcmc", spec, tmp_path / "nowhere") == spec["models"]["mcmc"]
