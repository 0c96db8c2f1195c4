"""Does ``torch.compile(model, fullgraph=True)`` trace a deep-supervision model on the Triton
kernels, and does its training step match eager? (CUDA only.)

``python -m bench.check_compile`` prints the graph-break count, the largest relative
differences of logits and gradients between compiled and eager, and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import ease_kernels
from bench.common import _atomic_write, environment
from ease import DeepSupervisionTransformer


def training_step(model, ids, targets):
    """Sum of the per-layer cross-entropies; returns the loss and the last layer's logits."""
    out = model(ids)
    loss = sum(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) for logits in out.values())
    return loss, out[model.num_layers]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_compile needs CUDA; nothing done")
        return 0
    torch.manual_seed(0)
    device = "cuda"
    model = DeepSupervisionTransformer(32000, 1024, 4, num_heads=8, num_kv_heads=2, max_seq_len=1024).to(device)
    ids = torch.randint(0, 32000, (4, 1024), device=device)
    targets = torch.randint(0, 32000, (4, 1024), device=device)
    assert ease_kernels.use_triton(torch.empty(1, device=device, dtype=torch.bfloat16))

    explanation = torch._dynamo.explain(model)(ids)
    results = {"graph_breaks": explanation.graph_break_count, "graphs": explanation.graph_count}

    def run(step_model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, logits = training_step(step_model, ids, targets)
        loss.backward()
        return loss.detach(), logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    loss_eager, logits_eager, grads_eager = run(model)
    compiled = torch.compile(model, fullgraph=True)
    loss_compiled, logits_compiled, grads_compiled = run(compiled)
    results.update(
        loss_eager=float(loss_eager),
        loss_compiled=float(loss_compiled),
        logits_relative_difference=relative(logits_compiled, logits_eager),
        worst_gradient_relative_difference=max(relative(grads_compiled[n], grads_eager[n]) for n in grads_eager),
        environment=environment(),
    )
    print(json.dumps(results, indent=2))
    _atomic_write(Path(args.out) / "compile-check.json", json.dumps(results, indent=2))
    ok = results["graph_breaks"] == 0 and results["worst_gradient_relative_difference"] < 2e-2
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
