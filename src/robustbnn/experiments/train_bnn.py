"""`robustbnn train-bnn` (the seed's model_bnn.py): a BNN by VI (Pyro SVI) or full-batch HMC.

With --test it prints the accuracy of the posterior predictive with 10 samples and that of each of
the first 10 samples alone, as the seed does.
"""

from robustbnn.experiments.models import model_folder, model_settings, record_metrics
from robustbnn.experiments.train_nn import add_train_arguments, train_and_test
from robustbnn.posterior import log_mean_softmax


def add_arguments(parser) -> None:
    add_train_arguments(parser, "bnn")


def run(args) -> dict:
    test = args.test
    args.test = False
    summary, data, post = train_and_test(args, "bnn")
    if test:
        first = post.take(min(10, post.n_samples))
        logits = first.logits(data.x_test)  # one pass serves the 10-sample and the single-sample accuracies
        y = data.y_test.to(logits.device)
        summary["test_acc_10"] = 100.0 * (log_mean_softmax(logits).argmax(-1) == y).float().mean().item()
        print(f"\n== Evaluate on test data ==\nAccuracy ({first.n_samples} samples): {summary['test_acc_10']:.2f}%")
        print("\n== Evaluate the first 10 posterior samples ==")
        single = (100.0 * (logits.argmax(-1) == y).float().mean(1)).tolist()
        for s, acc in enumerate(single):
            print(f"sample {s}: {acc:.2f}%")
        summary["single_sample_acc"] = single
        record_metrics(model_folder(args, model_settings("bnn", args)),
                       {k: summary[k] for k in ("test_acc_10", "single_sample_acc")})
    return summary
