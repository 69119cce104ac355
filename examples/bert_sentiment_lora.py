"""Sentiment classification with LoRA: BERT on rotten_tomatoes, before and after, and the adapter reloaded.

The recipe: take pretrained BERT with a freshly initialised classification head and measure test accuracy,
fine-tune LoRA (r=32, lora_alpha=4, dropout 0.1) on the attention's query/key/value projections with the
head trainable, measure again, save the adapter, load it into a fresh base model and show the same
accuracy. The published run went from 70% to 83% test accuracy (1,066 test sentences) with BERT.

    python examples/bert_sentiment_lora.py                        # hub: bert-base-uncased, rotten_tomatoes
    python examples/bert_sentiment_lora.py --model ../test-models/all-MiniLM-L6-v2 \\
        --data ../shared/data/rotten_tomatoes                     # offline, local files
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from common import (common_parser, peak_memory, print_metrics, resolve_device, run_script, subsample,
                    timed_evaluate, train_config, write_results)

import minilora as ml
from minilora.data import Collator, classification_dataset, load_records
from minilora.metrics import accuracy
from minilora.train.loop import seed_everything, train

OFFLINE_COMMAND = ("python examples/bert_sentiment_lora.py --model /path/to/all-MiniLM-L6-v2 "
                   "--data ../shared/data/rotten_tomatoes")


def build_parser() -> argparse.ArgumentParser:
    parser = common_parser(__doc__.split("\n")[0], model="google-bert/bert-base-uncased",
                           data="cornell-movie-review-data/rotten_tomatoes",
                           output_dir="out/bert_sentiment_lora", epochs=3, lr=1e-3, batch_size=16,
                           lora_r=32, lora_alpha=4, lora_dropout=0.1)
    parser.add_argument("--eval-split", default="test", help="split evaluated before and after training")
    parser.add_argument("--text-column", default="text", help="column holding the sentence")
    parser.add_argument("--label-column", default="label", help="column holding the class id")
    parser.add_argument("--num-labels", type=int, default=2, help="number of classes")
    parser.add_argument("--max-length", type=int, default=128, help="truncate sentences to this many tokens")
    parser.add_argument("--modules-to-save", default="classifier",
                        help="comma-separated modules trained in full and saved with the adapter (the head); "
                             "add 'pooler' when the checkpoint's pooler never was (sentence-transformers)")
    parser.add_argument("--warmup-ratio", type=float, default=0.06, help="fraction of steps of linear warmup")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    out_dir = Path(args.output_dir)
    seed_everything(args.seed)  # the fresh head's initialisation, LoRA's, and dropout

    # --- model and data ---------------------------------------------------------------------------------
    tokenizer = ml.load_tokenizer(args.model)
    model = ml.from_pretrained(args.model, task="sequence-classification", num_labels=args.num_labels,
                               device=device)
    train_rows = subsample(load_records(args.data, "train"), args.max_train_samples, args.seed)
    eval_rows = subsample(load_records(args.data, args.eval_split), args.max_eval_samples, args.seed)

    def features(rows):
        return classification_dataset(rows, tokenizer, text_column=args.text_column,
                                      label_column=args.label_column, num_labels=args.num_labels,
                                      max_length=args.max_length)

    train_data, eval_data = features(train_rows), features(eval_rows)
    print(f"{len(train_data)} training and {len(eval_data)} {args.eval_split} sentences")
    collate = Collator(pad_token_id=tokenizer.pad_token_id or 0)

    def compute_metrics(predictions, data):
        predicted = [int(np.argmax(logits)) for logits in predictions["logits"]]
        return {"accuracy": accuracy(predicted, [f["labels"] for f in data])}

    def evaluate(m):
        return timed_evaluate(m, eval_data, batch_size=64, collate_fn=collate,
                              compute_metrics=compute_metrics)

    # --- before: pretrained encoder, untrained head -------------------------------------------------------
    before = evaluate(model)
    print_metrics(f"before training ({args.eval_split})", before)

    # --- LoRA on query/key/value, the head (classifier) trained in full ---------------------------------
    lora = ml.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=["query", "key", "value"],
                         modules_to_save=args.modules_to_save.split(","))
    ml.apply_lora(model, lora)
    trainable, total = ml.trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    config = train_config(args, warmup_ratio=args.warmup_ratio, weight_decay=0.01, logging_steps=10,
                          eval_steps=max(1, -(-len(train_data) // args.batch_size)))  # eval once per epoch
    summary = train(model, train_data, config, eval_data=eval_data, collate_fn=collate,
                    compute_metrics=compute_metrics)
    print_metrics("training", summary)

    # --- after, then the saved adapter on a fresh base model ---------------------------------------------
    after = evaluate(model)
    print_metrics(f"after training ({args.eval_split})", after)
    adapter_dir = ml.save_adapter(model, out_dir / "adapter")
    fresh = ml.from_pretrained(args.model, task="sequence-classification", num_labels=args.num_labels,
                               device=device)
    reloaded = evaluate(ml.load_adapter(fresh, adapter_dir))
    print_metrics(f"adapter reloaded from {adapter_dir} ({args.eval_split})", reloaded)
    same = reloaded["eval_accuracy"] == after["eval_accuracy"]
    print(f"\nreloaded adapter gives the same accuracy: {same}")

    results = {"task": "sentiment classification (LoRA)", "model": args.model, "data": args.data,
               "eval_split": args.eval_split, "num_train_examples": len(train_data),
               "num_eval_examples": len(eval_data), "trainable_parameters": trainable,
               "total_parameters": total, "before": before, "train": summary, "after": after,
               "after_reload": reloaded, "reload_matches": same, "adapter_dir": str(adapter_dir),
               **peak_memory(device), "args": vars(args)}
    write_results(out_dir, results)
    if not same:
        print("error: the reloaded adapter does not reproduce the trained model's accuracy", file=sys.stderr)
    return results


if __name__ == "__main__":
    run_script(main, OFFLINE_COMMAND)
