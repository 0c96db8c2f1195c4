"""Turn a Llama into an early-exit model: convert, fine-tune with the three options, exit early.

    python examples/finetune_llama.py                   # a small random Llama, 1-2 minutes on a CPU
    python examples/finetune_llama.py --model-dir DIR   # a local Llama checkpoint and its tokenizer

Needs the ``hf`` extra (``pip install -e ".[hf]"``); nothing is downloaded.

1. **A Llama.** Without ``--model-dir``: a small random ``LlamaForCausalLM`` (grouped-query
   attention, Llama 3 RoPE scaling) trained for a few hundred steps at its final layer only,
   with plain Hugging Face code sped up by ``ease_kernels.patch_llama``: a stand-in for a
   pretrained checkpoint, whose intermediate layers were never asked to predict tokens.
   With ``--model-dir``: that checkpoint, and its tokenizer encoding the corpus.
2. **Conversion.** ``ease.from_hf_llama`` builds the EASE decoder; its logits are checked
   against the Hugging Face model's.
3. **Fine-tuning** on the built-in corpus, same batches, epochs and seed, two ways:
   ``standard`` (StandardTransformer, loss on the last layer) and ``L3T``
   (DeepSupervisionTransformer with ``layer_weights`` and ``layer_lr_scales``), then
   evaluation with ``routing_threshold``.
4. **Export.** The L3T model is written back with ``ease.to_hf_llama`` and reloaded by
   ``transformers``.

Prints a markdown table of validation figures (loss, perplexity, top-1 accuracy of every
exit, early-exit accuracy and the fraction of blocks it skips).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

import ease_kernels
from ease import (
    DeepSupervisionTransformer,
    StandardTransformer,
    Trainer,
    TrainingConfig,
    create_deep_supervision_config,
    create_standard_config,
    from_hf_llama,
    to_hf_llama,
)
from ease.data import load_data, load_text, make_batches, set_seed, split_tokens, unigram_baseline


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="local Llama checkpoint (config.json, *.safetensors, tokenizer files)")
    parser.add_argument("--export-dir", default="runs/finetune_llama/hf", help="where the fine-tuned model is written")
    parser.add_argument("--dim", type=int, default=128, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--vocab-size", type=int, default=1000, help="corpus BPE vocabulary (random Llama)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="final-layer steps of the random Llama")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs at most (early stopping)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning base learning rate")
    parser.add_argument("--threshold", type=float, default=0.5, help="routing_threshold of the table")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def l3t_options(num_layers: int) -> tuple[dict[int, float], dict[int, float]]:
    """The options of the L3T run.

    Loss weights grow with depth, ``w_l = l / sum(1..L)``: every exit is supervised and the
    last layer, the one the checkpoint was trained for, weighs most. Learning rates fall
    with depth from 1.0 to 0.25: the early layers, which must learn to answer, move most;
    the last ones, already good at it, move least.
    """
    total = num_layers * (num_layers + 1) / 2
    weights = {layer: round(layer / total, 4) for layer in range(1, num_layers + 1)}
    scales = {layer: round(1.0 - 0.75 * (layer - 1) / max(num_layers - 1, 1), 4) for layer in weights}
    return weights, scales


# ---------------------------------------------------------------------------------------
# 1. A Llama and the corpus
# ---------------------------------------------------------------------------------------
def random_llama(args, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.dim,
        intermediate_size=32 * round(8 * args.dim / 3 / 32),
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * args.seq_len,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": args.seq_len},
        tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def pretrain_final_layer(hf, train_batches, steps: int, device: str) -> float:
    """Plain Hugging Face training at the last layer only, with the ease kernels patched in."""
    ease_kernels.patch_llama(hf)
    hf.to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    loss = torch.tensor(float("nan"))
    for batch in itertools.islice(itertools.cycle(train_batches), steps):
        batch = batch.to(device)
        loss = hf(input_ids=batch, labels=batch).loss  # transformers shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    ease_kernels.unpatch(hf)
    return loss.item()


def corpus_with_checkpoint_tokenizer(args):
    """Batches of the built-in corpus encoded by the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    ids = torch.tensor(tokenizer(load_text())["input_ids"], dtype=torch.long)
    train_ids, val_ids = split_tokens(ids, val_fraction=0.1)
    train = make_batches(train_ids, args.batch_size, args.seq_len, shuffle=True, seed=args.seed, drop_last=True)
    val = make_batches(val_ids, args.batch_size, args.seq_len, shuffle=False, drop_last=False)
    return train, val, train_ids, val_ids, len(tokenizer), tokenizer


# ---------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------
def row(name: str, ev: dict, num_layers: int) -> str:
    layers = ev.get("layers")
    per_layer = "n/a"
    if layers:
        per_layer = " / ".join(f"{layers[layer]['accuracy']:.3f}" for layer in range(1, num_layers + 1))
    exit_stats = ev.get("early_exit")
    exit_cells = (
        f"{exit_stats['accuracy']:.3f} | {exit_stats['mean_exit_layer']:.2f} | {exit_stats['compute_saved']:.1%}"
        if exit_stats else "n/a | n/a | n/a"
    )
    return f"| {name} | {ev['loss']:.3f} | {ev['ppl']:.1f} | {ev['accuracy']:.3f} | {per_layer} | {exit_cells} |"


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    started = time.perf_counter()

    # 1. A Llama and the corpus it is fine-tuned on.
    if args.model_dir:
        train, val, train_ids, val_ids, vocab_size, tokenizer = corpus_with_checkpoint_tokenizer(args)
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(args.device)
        source = args.model_dir
        print(f"checkpoint {args.model_dir}: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f} M parameters")
    else:
        data = load_data(vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
        train, val, train_ids, val_ids, vocab_size = (
            data.train_batches, data.val_batches, data.train_ids, data.val_ids, data.vocab_size
        )
        tokenizer = data.tokenizer
        hf = random_llama(args, vocab_size)
        source = hf
        final_loss = pretrain_final_layer(hf, train, args.pretrain_steps, args.device)
        print(
            f"random LlamaForCausalLM: {args.layers} layers, hidden {args.dim}, 4 heads / 2 KV heads, "
            f"{sum(p.numel() for p in hf.parameters()) / 1e6:.2f} M parameters; "
            f"{args.pretrain_steps} final-layer steps (patched with ease_kernels), last loss {final_loss:.3f}"
        )
    hf.eval()
    num_layers = hf.config.num_hidden_layers
    print(f"corpus: {len(train)} training and {len(val)} validation batches of {args.batch_size} x {args.seq_len}")

    # 2. Conversion, checked against the Hugging Face logits.
    converted = from_hf_llama(source, DeepSupervisionTransformer, dtype=torch.float32, device=args.device)
    probe = val[0][:4, :-1].to(args.device)
    with torch.no_grad():
        expected = hf(probe).logits.float()
        got = converted(probe, exit_layers=[num_layers])[num_layers]
    difference = (got - expected).abs().max().item()
    print(f"conversion: max |logits - Hugging Face logits| = {difference:.2e} "
          f"(max |logits| {expected.abs().max():.2f})")

    # 3. Fine-tuning, two ways, from the same weights.
    weights, scales = l3t_options(num_layers)
    print(f"L3T options: layer_weights={weights}, layer_lr_scales={scales}, routing_threshold={args.threshold}")
    runs = {
        "standard fine-tune": (StandardTransformer, create_standard_config(num_layers, seed=args.seed, verbose=False)),
        "L3T fine-tune": (
            DeepSupervisionTransformer,
            TrainingConfig(layer_weights=weights, layer_lr_scales=scales, routing_threshold=args.threshold,
                           seed=args.seed, verbose=False),
        ),
    }
    probe_trainer = Trainer(create_deep_supervision_config(num_layers, verbose=False), vocab_size=vocab_size)
    results = {"converted, not fine-tuned": probe_trainer.evaluate(converted, val, routing_threshold=args.threshold)}
    models = {}
    for name, (cls, config) in runs.items():
        set_seed(args.seed)
        model = from_hf_llama(source, cls, dtype=torch.float32, device=args.device)
        trainer = Trainer(config, vocab_size=vocab_size)
        optimizer = trainer.create_optimizer(model, base_lr=args.lr)
        tick = time.perf_counter()
        outcome = trainer.train_with_early_stopping(
            model=model, train_batches=train, val_batches=val, optimizer=optimizer,
            max_epochs=args.epochs, patience=1, verbose=False,
        )
        results[name] = trainer.evaluate(model, val, routing_threshold=args.threshold)
        models[name] = model
        print(f"{name}: {outcome.epochs_run} epoch(s), best {outcome.best_epoch}, {time.perf_counter() - tick:.0f} s")

    # The table.
    base = unigram_baseline(train_ids, val_ids, vocab_size)
    layer_names = " / ".join(f"L{layer}" for layer in range(1, num_layers + 1))
    print()
    print(f"| model | val loss | PPL | final-layer acc | per-layer acc ({layer_names}) | "
          f"early-exit acc (τ={args.threshold:g}) | mean exit layer | compute saved |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| unigram baseline | {base['loss']:.3f} | {base['ppl']:.1f} | {base['accuracy']:.3f} | | | | |")
    for name, ev in results.items():
        print(row(name, ev, num_layers))

    sweep_trainer = Trainer(runs["L3T fine-tune"][1], vocab_size=vocab_size)
    print()
    print("| threshold | L3T early-exit acc | mean exit layer | compute saved "
          "| converted, not fine-tuned: acc | compute saved |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for threshold in (0.3, 0.5, 0.7, 0.9):
        tuned = sweep_trainer.evaluate(models["L3T fine-tune"], val, routing_threshold=threshold)["early_exit"]
        plain = probe_trainer.evaluate(converted, val, routing_threshold=threshold)["early_exit"]
        print(f"| {threshold:g} | {tuned['accuracy']:.3f} | {tuned['mean_exit_layer']:.2f} "
              f"| {tuned['compute_saved']:.1%} | {plain['accuracy']:.3f} | {plain['compute_saved']:.1%} |")

    # 4. Back to Hugging Face.
    from transformers import LlamaForCausalLM

    export = to_hf_llama(models["L3T fine-tune"], args.export_dir)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(export)
    else:
        tokenizer.save(str(Path(export) / "tokenizer.json"))
    reloaded = LlamaForCausalLM.from_pretrained(export).to(args.device).eval()
    with torch.no_grad():
        ours = models["L3T fine-tune"](probe, exit_layers=[num_layers])[num_layers]
        difference = (reloaded(probe).logits - ours).abs().max().item()
    print(f"\nexported to {export}; transformers reloads it: max |logits difference| = {difference:.2e}")
    print(f"total {time.perf_counter() - started:.0f} s on {args.device}")
    return results


if __name__ == "__main__":
    main()
