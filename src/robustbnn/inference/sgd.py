"""Deterministic networks and ensembles, trained with Adam on the cross-entropy of the logits.

An ensemble of K members is trained as one stacked problem: member k is initialised with seed k and
shuffles its data with its own generator seeded k; the K forward passes run at once under
`torch.func.vmap`, and because Adam is elementwise one optimiser over the stacked parameters is K
independent optimisers. A single network is the case K = 1 (seed = its seed).
"""

from __future__ import annotations

import math
import time

import torch
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from robustbnn.data import validate_xy
from robustbnn.device import flushing_denormals
from robustbnn.errors import UserError
from robustbnn.inference.checkpoint import data_digest, load_checkpoint, save_checkpoint
from robustbnn.nets import as_architecture, init_params, template
from robustbnn.forward import DEFAULT_BUDGET, activation_numel
from robustbnn.posterior import Posterior


def check_net(arch, x: torch.Tensor, num_classes: int | None = None, y: torch.Tensor | None = None) -> None:
    """Refuse, in one line, an architecture that cannot be trained on inputs like `x`: one without parameters,
    one whose forward fails on one input `x[:1]` (e.g. another input size), or one whose output for it is not
    logits of shape (1, num_classes) (`num_classes` None: (1, K) with K above every label in `y`)."""
    arch = as_architecture(arch)
    what = "the architecture" if arch.builtin_spec else f"the architecture {arch.factory}"
    net = template(arch)  # a built-in that does not fit the inputs (conv on vectors) is refused here
    if not any(p.numel() for p in net.parameters()):
        raise UserError(f"{what} has no parameters to train")
    x1 = torch.as_tensor(x[:1]).float().cpu()
    spec = arch.builtin_spec
    if spec and math.prod(x1.shape[1:]) == math.prod(spec["input_shape"]):
        x1 = x1.reshape(1, *spec["input_shape"])
    try:
        with torch.no_grad():
            out = net(x1)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises, in one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{what} fails on one training input of shape {tuple(x1.shape[1:])}: "
                        f"{type(exc).__name__}: {detail}") from None
    shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
    ok = torch.is_tensor(out) and out.dim() == 2 and out.shape[0] == 1 and (
        out.shape[1] == num_classes if num_classes is not None else (y is None or out.shape[1] > int(y.max())))
    if not ok:
        want = (f"(1, {num_classes}) (the data has {num_classes} classes)" if num_classes is not None else
                "(1, K) with K above the largest label" + (f" ({int(y.max())})" if y is not None else ""))
        raise UserError(f"{what} outputs {shape} for one input of shape {tuple(x1.shape[1:])}; it must output "
                        f"logits of shape {want}")


def member_groups(arch, seeds: list[int], batch_size: int, budget: int = DEFAULT_BUDGET,
                  input_shape=None) -> list[list[int]]:
    """Split the members into groups whose stacked activations (forward and backward) fit the budget."""
    shape = input_shape or as_architecture(arch).builtin_spec["input_shape"]
    per_member = 3 * activation_numel(template(arch), shape) * batch_size
    size = max(1, min(len(seeds), budget // per_member))
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


@flushing_denormals()
def train_nets(arch, x: torch.Tensor, y: torch.Tensor, *, seeds: list[int], epochs: int, lr: float,
               batch_size: int, device="cpu", checkpoint=None, resume: bool = False, progress: bool = False,
               log=print) -> Posterior:
    """Train one network per seed with Adam(lr) on mean cross-entropy, `epochs` passes of minibatches.

    `arch` is a built-in spec dict (fc, fc2, conv) or any importable `Architecture`.

    Returns the members stacked as a Posterior (sample k = member seeds[k]) of kind nn (one seed) or
    ensemble, with the per-epoch history [{epoch, member, loss, train_acc, time_s}] in
    meta["history"] (time_s: the epoch of the member's group, whose members train jointly). With
    `checkpoint` (a folder) the state is saved after every epoch of every member group, and
    `resume` continues from it.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise UserError(f"need epochs >= 1, batch_size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    if not seeds:
        raise UserError("train_nets needs at least one seed")
    spec = as_architecture(arch).builtin_spec or {}
    x, y = validate_xy(x, y, spec.get("input_shape"), spec.get("num_classes"))
    check_net(arch, x, spec.get("num_classes"), y)
    x, y = x.to(device), y.to(device)  # once: each step then gathers on the device
    # a checkpoint continues only the same run: architecture, members, optimiser settings and data (more epochs
    # continue it: Adam's rate is constant, so a run stopped at epoch e is the first e epochs of a longer one)
    fingerprint = dict(arch=as_architecture(arch).to_json(), seeds=list(seeds), lr=float(lr),
                       batch_size=int(batch_size), data=data_digest(x, y))
    state = load_checkpoint(checkpoint, fingerprint=fingerprint) if (checkpoint and resume) else None
    done = state["done"] if state else {}
    history = state["history"] if state else []
    _check_resumed_epochs(state, epochs)
    groups = member_groups(arch, list(seeds), batch_size, input_shape=x.shape[1:])
    for group in groups:
        key = ",".join(map(str, group))
        if key in done:
            continue
        partial = state.get("group") if state and state.get("group_key") == key else None
        done[key], history = _train_group(arch, x, y, group, epochs, lr, batch_size, device, checkpoint, partial,
                                          done, history, progress, log, fingerprint)
    params = {k: torch.cat([done[",".join(map(str, g))][k] for g in groups]) for k in done[next(iter(done))]}
    meta = {"inference": "nn" if len(seeds) == 1 else "ensemble", "seeds": list(seeds), "epochs": int(epochs),
            "lr": float(lr), "batch_size": int(batch_size), "history": history}
    return Posterior.from_arch(as_architecture(arch), {k: v.to(device) for k, v in params.items()},
                               kind="nn" if len(seeds) == 1 else "ensemble", meta=meta)


def _check_resumed_epochs(state: dict | None, epochs: int) -> None:
    """More epochs continue only the group a checkpoint was interrupted in: members it finished keep theirs, and a
    group cannot be cut back. So a resumed run must ask for the epochs every finished member has, and no fewer than
    the interrupted group has run."""
    if not state:
        return
    finished = {m for key in state["done"] for m in key.split(",")}  # member seeds
    last = {}
    for h in state["history"]:
        if str(h["member"]) in finished:
            last[str(h["member"])] = max(last.get(str(h["member"]), 0), int(h["epoch"]))
    trained, ran = set(last.values()), int((state.get("group") or {}).get("epoch", 0))
    if trained - {epochs} or ran > epochs:
        held = max(trained | {ran})
        raise UserError(f"the checkpoint holds members trained for {held} epochs; resume with --epochs {held}, or "
                        "start afresh with --resume=False")


def _train_group(arch, x, y, group, epochs, lr, batch_size, device, checkpoint, partial, done, history, progress,
                 log, fingerprint=None):
    net = template(arch).to(device)
    if partial:
        params = {k: v.to(device).requires_grad_() for k, v in partial["params"].items()}
    else:
        inits = [init_params(arch, s) for s in group]
        params = {k: torch.stack([p[k] for p in inits]).to(device).requires_grad_() for k in inits[0]}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    gens = [torch.Generator().manual_seed(s) for s in group]
    start = 0
    if partial:
        opt.load_state_dict(partial["optimizer"])
        for g, st in zip(gens, partial["generators"]):
            g.set_state(st)
        start = partial["epoch"]
    n, k = len(x), len(group)
    forward = vmap(lambda p, xb: functional_call(net, p, (xb,)), in_dims=(0, 0))
    steps = math.ceil(n / batch_size)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        loss_sum = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs} members {group[0]}..{group[-1]}",
                   disable=not progress, leave=False)
        for b in bar:
            idx = perms[:, b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            logits = forward(params, xb)  # (K, B, C)
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
            losses = losses.view(k, -1).mean(1)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()  # members do not share parameters: the sum gives each its own gradient
            opt.step()
            with torch.no_grad():
                loss_sum += losses.detach() * idx.shape[1]
                correct += (logits.argmax(-1) == yb).sum(1)
        losses = (loss_sum / n).cpu()
        if not torch.isfinite(losses).all():
            raise UserError(f"training diverged (non-finite loss) at epoch {epoch + 1}; lower --lr"
                            + ("; the last good checkpoint is kept" if checkpoint else ""))
        elapsed = time.perf_counter() - t0
        accs = (100.0 * correct / n).cpu()
        for i, s in enumerate(group):
            history.append(dict(epoch=epoch + 1, member=s, loss=losses[i].item(), train_acc=accs[i].item(),
                                time_s=elapsed))
        who = f" members {group[0]}..{group[-1]}" if k > 1 else ""
        log(f"[epoch {epoch + 1}/{epochs}]{who}  loss {losses.mean():.4f}  "
            f"train acc {accs.mean():.2f}%  ({elapsed:.1f}s)")
        if checkpoint:
            save_checkpoint(checkpoint, dict(
                fingerprint=fingerprint, done=done, history=history, group_key=",".join(map(str, group)),
                group=dict(params={k_: v.detach().cpu() for k_, v in params.items()}, optimizer=opt.state_dict(),
                           generators=[g.get_state() for g in gens], epoch=epoch + 1)))
    return {k_: v.detach().cpu() for k_, v in params.items()}, history
