"""The command line's work: one thin module per command (it has `add_arguments` and `run(args)`).

Commands never import each other; what they share lives in helper modules: `common` (flag types,
setup, summaries), `model_flags` (the model flags, train-or-load by --train), `attacking` (attack settings,
adversarial files, per-input tables), `gradients` (expected-gradient files), `half_moons` (the
Figure 1 grid) and `demo_report` (the demo's markdown). The library below them holds what is not argparse:
model settings, folders and training in `robustbnn.runs`, markdown tables in `robustbnn.reports`, figures in
`robustbnn.plots`. Nothing in the library imports this package.
"""
