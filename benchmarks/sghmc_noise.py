"""How far from diagonal is SGHMC's minibatch-gradient noise on the study's MLPs, and how much less friction does a
per-weight noise-matched friction (`--adaptive_friction`) give its principal directions than they call for?

For fc2 (leaky ReLU) trained 2 epochs with Adam on all of MNIST (hidden 512) or Fashion-MNIST (hidden 1024), the
per-point gradients of 3000 training points, g_n = delta_n (x) a_n per layer, give the noise covariance of a
minibatch gradient of U, C = (N^2 / B) Cov_n(g_n) (B = 500). Its eigenvalues come from the 3000 x 3000 Gram matrix
of the centred g_n (sum over layers of (delta delta^T) * (a a^T) + delta delta^T, for weights and biases), without
forming C. Per layer and for all layers:

- ratio: lambda_1 / (u_1^T diag(C) u_1), the top direction's noise over what a diagonal matched friction damps
  along it (1 for a diagonal C);
- eta_lambda_k: eta lambda_k / T at the study's eta_0 (lr / N), for k = 1, 8, 32, 64: above about 4 no friction
  can absorb a direction's noise at that step (`inference.sghmc`);
- top5_share: the share of trace C in the top 5 eigenvalues.

    python benchmarks/sghmc_noise.py [--dataset mnist|fashion_mnist] [--threads N] [--quick]

Prints JSON lines {"benchmark", "metric", "value", "unit", "baseline", "ratio"}; needs the fetched dataset.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import emit, setup
from robustbnn.data import load_dataset
from robustbnn.errors import UserError

HIDDEN = {"mnist": 512, "fashion_mnist": 1024}
LR = {"mnist": 0.2, "fashion_mnist": 0.15}  # presets.SGHMC_STUDY's eta_0 per data point


def train(x, y, hidden: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(),
                        nn.Linear(hidden, 10))
    opt = torch.optim.Adam(net.parameters(), 0.01)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(500):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net


def layer_factors(net: nn.Sequential, x, y):
    """[(delta (n, out), a (n, in))] per Linear layer: the per-point gradient of the NLL is delta (x) a for the
    weight and delta for the bias."""
    l1, l2, l3 = net[0], net[2], net[4]
    with torch.no_grad():
        z1 = x @ l1.weight.T + l1.bias
        h1 = F.leaky_relu(z1)
        z2 = h1 @ l2.weight.T + l2.bias
        h2 = F.leaky_relu(z2)
        e = (h2 @ l3.weight.T + l3.bias).softmax(1)
        e[torch.arange(len(y)), y] -= 1
        d2 = (e @ l3.weight) * torch.where(z2 > 0, 1.0, 0.01)
        d1 = (d2 @ l2.weight) * torch.where(z1 > 0, 1.0, 0.01)
    return [(d1.double(), x.double()), (d2.double(), h1.double()), (e.double(), h2.double())]


def spectrum(factors, scale: float):
    """(eigenvalues of C descending, u_1^T diag(C) u_1, trace C) for the layers in `factors`, C = scale Cov_n(g_n)."""
    n = len(factors[0][0])
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram = sum(centre @ ((d @ d.T) * (a @ a.T) + d @ d.T) @ centre for d, a in factors)
    eig, vec = torch.linalg.eigh(gram / n)
    c = centre @ vec[:, -1]  # u_1 = G_c^T c / |G_c^T c|, G_c the centred per-point gradients
    num = den = trace = 0.0
    for d, a in factors:
        var_w = (d.square().T @ a.square()) / n - ((d.T @ a) / n).square()
        var_b = d.square().mean(0) - d.mean(0).square()
        u_w, u_b = (d * c[:, None]).T @ a, (d * c[:, None]).sum(0)
        num += (u_w.square() * var_w).sum().item() + (u_b.square() * var_b).sum().item()
        den += u_w.square().sum().item() + u_b.square().sum().item()
        trace += var_w.sum().item() + var_b.sum().item()
    return eig.flip(0) * scale, num / den * scale, trace * scale


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(HIDDEN), default="mnist")
    args = setup(parser)  # --quick: trained on the first 5000 points, the spectrum of 500
    try:
        data = load_dataset(args.dataset)
    except UserError as exc:  # make bench runs every benchmark: say why this one did not run
        emit("sghmc_noise", "skipped", None, str(exc))
        return
    x, y = data.x_train.reshape(len(data.x_train), -1).float(), data.y_train
    net = train(x[:5000], y[:5000], HIDDEN[args.dataset]) if args.quick else train(x, y, HIDDEN[args.dataset])
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:500 if args.quick else 3000]
    factors = layer_factors(net, x[pick], y[pick])
    n, b = len(x), 500
    eta = LR[args.dataset] / n
    for name, part in (("layer1", factors[:1]), ("layer2", factors[1:2]), ("output", factors[2:]), ("all", factors)):
        eig, along_u1, trace = spectrum(part, n**2 / b)
        tag = f"{args.dataset}_{name}"
        emit("sghmc_noise", f"{tag}_ratio", round(eig[0].item() / along_u1, 1), "lambda_1 / u1' diag(C) u1")
        for k in (1, 8, 32, 64):
            emit("sghmc_noise", f"{tag}_eta_lambda_{k}", float(f"{eta * eig[k - 1].item():.3g}"), "eta lambda / T")
        emit("sghmc_noise", f"{tag}_diagonal_friction_along_u1", float(f"{eta * along_u1:.3g}"),
             "eta u1' diag(C) u1 / T")
        emit("sghmc_noise", f"{tag}_top5_share", round(eig[:5].sum().item() / trace, 3), "of trace C")


if __name__ == "__main__":
    main()
