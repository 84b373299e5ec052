"""`robustbnn train-bnn` (the seed's model_bnn.py): a BNN by VI (Pyro SVI) or full-batch HMC.

With --test it prints the accuracy of the posterior predictive with 10 samples and that of each of
the first 10 samples alone, as the seed does.
"""

from robustbnn.experiments.models import model_folder, model_settings, record_metrics
from robustbnn.experiments.train_nn import add_train_arguments, train_and_test


def add_arguments(parser) -> None:
    add_train_arguments(parser, "bnn")


def run(args) -> dict:
    test = args.test
    args.test = False
    summary, data, post = train_and_test(args, "bnn")
    if test:
        first = post.take(min(10, post.n_samples))
        summary["test_acc_10"] = first.accuracy(data.x_test, data.y_test)
        print(f"\n== Evaluate on test data ==\nAccuracy ({first.n_samples} samples): {summary['test_acc_10']:.2f}%")
        print("\n== Evaluate the first 10 posterior samples ==")
        logits = first.logits(data.x_test)
        single = [(logits[s].argmax(-1).cpu() == data.y_test).float().mean().item() * 100 for s in range(len(logits))]
        for s, acc in enumerate(single):
            print(f"sample {s}: {acc:.2f}%")
        summary["test_acc_all"] = post.accuracy(data.x_test, data.y_test)
        summary["single_sample_acc"] = single
        record_metrics(model_folder(args, model_settings("bnn", args)),
                       {k: summary[k] for k in ("test_acc_10", "test_acc_all", "single_sample_acc")})
    return summary
