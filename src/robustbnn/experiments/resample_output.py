"""`robustbnn resample-output`: an MCMC posterior's output layer redrawn from its conditional (a Gibbs block).

Takes `--samples` draws evenly spaced over every chain of a saved posterior (a perceptron ending in a Linear layer:
fc, fc2 or your own), replaces each draw's output layer by a draw of its exact conditional given that draw's other
layers and the first `--train_inputs` training points (`inference.output_gibbs`: Metropolis-adjusted HMC on a
softmax regression, whitened by its Hessian), and writes the new posterior to `--out` (posterior.safetensors and
config.json), ready for `evaluate --model`; the finished draws are saved as it goes, so a rerun after an
interruption continues where it stopped. Prints each draw's output-layer configurational temperature (1 on the
posterior) and training log-likelihood before and after. The prior scale and temperature are the model's own when it
records them (an SGHMC or HMC run does), else --prior_scale and --temperature.
"""

from __future__ import annotations

from pathlib import Path

from robustbnn.artifacts import write_config
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.experiments.common import add_common, positive_float, positive_int, settings_of, setup
from robustbnn.inference import output_gibbs
from robustbnn.inference.checkpoint import clear_checkpoint
from robustbnn.runs import DEFAULT_N_INPUTS
from robustbnn.storage import WEIGHTS_FILE, load


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH", help="a saved MCMC posterior (folder or file)")
    parser.add_argument("--out", required=True, help="the folder the new posterior is written to")
    parser.add_argument("--samples", type=positive_int, default=20,
                        help="draws kept, evenly spaced over every chain (the evaluation's usual 20)")
    parser.add_argument("--train_inputs", type=positive_int, default=DEFAULT_N_INPUTS,
                        help="the first n training points, as the model was trained on")
    parser.add_argument("--arch", default=None,
                        help="your own architecture's factory 'package.module:function' (a file never names code)")
    parser.add_argument("--prior_scale", type=positive_float, default=1.0,
                        help="std of the N(0, s^2) weight prior, when the model does not record it")
    parser.add_argument("--temperature", type=positive_float, default=1.0,
                        help="posterior temperature T, when the model does not record it")
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="rounds of HMC per draw, each whitened by the Hessian at its starting point")
    parser.add_argument("--warmup", type=positive_int, default=15, help="HMC iterations per round")
    parser.add_argument("--num_steps", type=positive_int, default=50, help="leapfrog steps per HMC iteration")
    parser.add_argument("--dataset", default=None, help="the training data (default: the one the model records)")
    add_common(parser)


def run(args) -> dict:
    device = setup(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    model = Path(args.model)
    if (out / WEIGHTS_FILE).resolve() == (model / WEIGHTS_FILE if model.is_dir() else model).resolve():
        raise UserError(f"--out {out} holds the model itself; write the new posterior to another folder")
    post = load(args.model, device=device, arch=args.arch)
    if getattr(post, "kind", None) != "mcmc":
        raise UserError(f"{args.model} is not an MCMC posterior; the output-layer Gibbs block redraws MCMC draws")
    dataset = args.dataset or post.meta.get("dataset")
    if dataset is None:
        raise UserError(f"the model at {args.model} does not record its dataset: give --dataset")
    data = load_dataset(dataset, args.train_inputs, args.data_dir, splits=("train",))
    recorded = {**(post.meta.get(post.meta.get("inference")) or {}), **(post.meta.get("settings") or {})}
    prior_scale = float(recorded.get("prior_scale") or args.prior_scale)
    temperature = float(recorded.get("temperature") or args.temperature)
    post = post.samples(min(args.samples, post.n_samples), args.seed)
    print(f"\n=== output-layer Gibbs block: {post.n_samples} draws of {args.model}, {len(data.x_train)} training "
          f"points of {dataset}, prior scale {prior_scale:g}, temperature {temperature:g}")
    new = output_gibbs.resample(post, data.x_train.to(device), data.y_train.to(device), prior_scale=prior_scale,
                                temperature=temperature, rounds=args.rounds, warmup=args.warmup,
                                num_steps=args.num_steps, seed=args.seed, checkpoint=out)
    new.save(out)
    write_config(out, settings_of(args))
    clear_checkpoint(out)
    draws = new.meta["output_gibbs"]["draws"]
    mean = lambda key: sum(d[key] for d in draws) / len(draws)  # noqa: E731
    return {"model": str(out), "samples": len(draws),
            "temperature_before": output_gibbs.layer_temperature(draws, "before"),
            "temperature_after": output_gibbs.layer_temperature(draws, "after"),
            "loglik_before": mean("loglik_before"), "loglik_after": mean("loglik_after"),
            "time_s": new.meta["output_gibbs"]["time_s"]}
