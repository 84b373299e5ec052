"""`robustbnn resample-output`: an MCMC posterior's output layer redrawn from its conditional (a Gibbs block).

Takes `--samples` draws evenly spaced over every chain of a saved posterior (a perceptron ending in a Linear layer:
fc, fc2 or your own), replaces each draw's output layer by a draw of its exact conditional given that draw's other
layers and the first `--train_inputs` training points (`inference.output_gibbs`: Metropolis-adjusted HMC on a
softmax regression, whitened by its Hessian), and writes the new posterior to `--out` (posterior.safetensors and
config.json), ready for `evaluate --model`; the finished draws are saved as it goes, so a rerun after an
interruption continues where it stopped. Prints each draw's output-layer configurational temperature (T on the
posterior at temperature T) and training log-likelihood before and after. The prior scale, the temperature and the
number of training points are the model's own when it records them (a model trained by robustbnn does; HMC samples
at T = 1), else --prior_scale, --temperature and --train_inputs; a flag that contradicts the record is an error,
since it would redraw the output layer from another posterior.
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


def recorded(value, flag, name: str, default: float) -> float:
    """The model's recorded `value` of a setting; else the --`name` flag, else `default`. A flag that differs from
    the record is a one-line error: it would condition on another posterior than the one the draws come from."""
    if value is None:
        return float(default if flag is None else flag)
    if flag is not None and float(flag) != float(value):
        raise UserError(f"the model was sampled with {name} {value:g}; --{name} {flag:g} would redraw its output "
                        f"layer from another posterior (leave the flag out)")
    return float(value)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH", help="a saved MCMC posterior (folder or file)")
    parser.add_argument("--out", required=True, help="the folder the new posterior is written to")
    parser.add_argument("--samples", type=positive_int, default=20,
                        help="draws kept, evenly spaced over every chain (the evaluation's usual 20)")
    parser.add_argument("--train_inputs", type=positive_int, default=None,
                        help=f"the first n training points, when the model does not record them (default "
                             f"{DEFAULT_N_INPUTS})")
    parser.add_argument("--arch", default=None,
                        help="your own architecture's factory 'package.module:function' (a file never names code)")
    parser.add_argument("--prior_scale", type=positive_float, default=None,
                        help="std of the N(0, s^2) weight prior, when the model does not record it (default 1)")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="posterior temperature T, when the model does not record it (default 1)")
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
    if (out / WEIGHTS_FILE).exists():  # the model itself, or another one
        raise UserError(f"--out {out} already holds a posterior ({WEIGHTS_FILE}); write the new one to another folder")
    post = load(args.model, device=device, arch=args.arch)
    if getattr(post, "kind", None) != "mcmc":
        raise UserError(f"{args.model} is not an MCMC posterior; the output-layer Gibbs block redraws MCMC draws")
    inference = post.meta.get("inference")
    sampler, trained = post.meta.get(inference) or {}, post.meta.get("settings") or {}
    if sampler.get("mode") == "legacy":
        raise UserError(f"{args.model} holds the paper's per-minibatch HMC chains, not draws of a posterior of the "
                        "training data; the Gibbs block needs one")
    dataset = args.dataset or post.meta.get("dataset")
    if dataset is None:
        raise UserError(f"the model at {args.model} does not record its dataset: give --dataset")
    if post.meta.get("dataset") not in (None, dataset):
        raise UserError(f"the model was sampled on {post.meta['dataset']}; --dataset {dataset} would redraw its "
                        "output layer from another posterior (leave the flag out)")
    prior_scale = recorded(sampler.get("prior_scale"), args.prior_scale, "prior_scale", 1.0)
    temperature = recorded(sampler.get("temperature", 1.0 if inference == "hmc" else None), args.temperature,
                           "temperature", 1.0)
    n_train = int(recorded(trained.get("n_inputs"), args.train_inputs, "train_inputs", DEFAULT_N_INPUTS))
    data = load_dataset(dataset, n_train, args.data_dir, splits=("train",))
    post = post.samples(args.samples, args.seed)  # (more than it holds: a one-line error)
    print(f"\n=== output-layer Gibbs block: {post.n_samples} draws of {args.model}, {len(data.x_train)} training "
          f"points of {dataset}, prior scale {prior_scale:g}, temperature {temperature:g}")
    new = output_gibbs.resample(post, data.x_train.to(device), data.y_train.to(device), prior_scale=prior_scale,
                                temperature=temperature, rounds=args.rounds, warmup=args.warmup,
                                num_steps=args.num_steps, seed=args.seed, checkpoint=out)
    new.save(out)
    write_config(out, dict(settings_of(args), prior_scale=prior_scale, temperature=temperature, train_inputs=n_train,
                           dataset=dataset))
    clear_checkpoint(out)
    draws = new.meta["output_gibbs"]["draws"]
    mean = lambda key: sum(d[key] for d in draws) / len(draws)  # noqa: E731
    return {"model": str(out), "samples": len(draws),
            "temperature_before": output_gibbs.layer_temperature(draws, "before"),
            "temperature_after": output_gibbs.layer_temperature(draws, "after"),
            "loglik_before": mean("loglik_before"), "loglik_after": mean("loglik_after"),
            "time_s": new.meta["output_gibbs"]["time_s"]}
