"""The command line's work: one thin module per command (it has `add_arguments` and `run(args)`).

Commands never import each other; what they share lives in helper modules: `common` (flag types,
setup, summaries), `runs` (model settings, folders, train-or-load), `attacking` (attack settings,
adversarial files, per-input tables), `gradients` (expected-gradient files), `half_moons` (the
Figure 1 grid) and `demo_report` (the demo's markdown). Figures are in `robustbnn.plots`.
"""
