"""Extractive question answering with LoRA: BERT fine-tuned on 1,000 SQuAD questions for 2 epochs.

The recipe: start from `deepset/bert-base-cased-squad2` (BERT-base already trained for SQuAD 2.0), measure
exact match and F1 on SQuAD validation, fine-tune LoRA adapters (and the span head) on 1,000 SQuAD training
questions for 2 epochs, and report the trainer's numbers (global step, training loss, runtime, steps/s,
samples/s, total FLOPs, epochs) and exact match / F1 again. Long contexts are split into overlapping
windows (`--max-length` tokens, `--doc-stride` overlap), and answers come back as text the usual way.

    python examples/bert_squad_lora.py                              # hub: deepset/bert-base-cased-squad2
    python examples/bert_squad_lora.py --model ../test-models/all-MiniLM-L6-v2 \\
        --data ../shared/data/squad                                 # offline (a BertModel: the head is new)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import (common_parser, peak_memory, print_metrics, resolve_device, run_script, subsample,
                    timed_evaluate, train_config, write_results)

import minilora as ml
from minilora.data import Collator, load_records, postprocess_qa_predictions, qa_dataset
from minilora.metrics import squad_metrics
from minilora.train.loop import seed_everything, train

OFFLINE_COMMAND = ("python examples/bert_squad_lora.py --model /path/to/all-MiniLM-L6-v2 "
                   "--data ../shared/data/squad")
# deepset's repo has vocab.txt but no tokenizer.json (the only format minilora reads); bert-base-cased's
# tokenizer.json has the same vocabulary and casing.
TOKENIZER_FOR = {"deepset/bert-base-cased-squad2": "google-bert/bert-base-cased"}


def build_parser() -> argparse.ArgumentParser:
    parser = common_parser(__doc__.split("\n")[0], model="deepset/bert-base-cased-squad2",
                           data="rajpurkar/squad", output_dir="out/bert_squad_lora", epochs=2, lr=2e-4,
                           batch_size=16, max_train_samples=1000, lora_r=16, lora_alpha=32, lora_dropout=0.1)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub id (default: --model's; google-bert/bert-base-cased "
                             "for deepset/bert-base-cased-squad2, which lacks tokenizer.json)")
    parser.add_argument("--eval-split", default="validation", help="split scored with exact match and F1")
    parser.add_argument("--max-length", type=int, default=384, help="tokens per question + context window")
    parser.add_argument("--doc-stride", type=int, default=128, help="overlap of consecutive context windows")
    parser.add_argument("--target-modules", default="query,key,value,dense",
                        help="comma-separated names of the linear layers that get LoRA")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    out_dir = Path(args.output_dir)
    seed_everything(args.seed)  # a new span head (for a checkpoint without one), LoRA init, dropout

    # --- model and data: questions become overlapping context windows ("features") -----------------------
    tokenizer = ml.load_tokenizer(args.tokenizer or TOKENIZER_FOR.get(args.model, args.model))
    model = ml.from_pretrained(args.model, task="question-answering", device=device)
    train_rows = subsample(load_records(args.data, "train"), args.max_train_samples, args.seed)
    eval_rows = subsample(load_records(args.data, args.eval_split), args.max_eval_samples, args.seed)
    windows = dict(max_length=args.max_length, doc_stride=args.doc_stride)
    train_data = qa_dataset(train_rows, tokenizer, **windows)
    eval_data = qa_dataset(eval_rows, tokenizer, **windows)
    print(f"train: {len(train_rows)} questions -> {len(train_data)} windows; "
          f"{args.eval_split}: {len(eval_rows)} questions -> {len(eval_data)} windows")
    collate = Collator(pad_token_id=tokenizer.pad_token_id or 0)
    gold = {row.get("id", i): row["answers"]["text"] for i, row in enumerate(eval_rows)}

    def compute_metrics(predictions, features):  # window logits -> best answer text per question -> EM/F1
        answers = postprocess_qa_predictions(eval_rows, features, predictions["start_logits"],
                                             predictions["end_logits"])
        return squad_metrics(answers, gold)

    def evaluate(m):
        return timed_evaluate(m, eval_data, batch_size=32, collate_fn=collate,
                              compute_metrics=compute_metrics)

    before = evaluate(model)
    print_metrics(f"before training ({args.eval_split})", before)

    # --- LoRA, span head (qa_outputs) trained in full, as peft does for question answering ---------------
    lora = ml.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=args.target_modules.split(","), modules_to_save=["qa_outputs"])
    ml.apply_lora(model, lora)
    trainable, total = ml.trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    config = train_config(args, warmup_ratio=0.1, logging_steps=5)
    summary = train(model, train_data, config, collate_fn=collate)
    print_metrics("training", summary)
    after = evaluate(model)
    print_metrics(f"after training ({args.eval_split})", after)
    adapter_dir = ml.save_adapter(model, out_dir / "adapter")
    print(f"adapter saved to {adapter_dir}")

    results = {"task": "extractive QA (LoRA)", "model": args.model, "data": args.data,
               "eval_split": args.eval_split, "num_train_questions": len(train_rows),
               "num_train_windows": len(train_data), "num_eval_questions": len(eval_rows),
               "trainable_parameters": trainable, "total_parameters": total, "before": before,
               "train": summary, "after": after, "adapter_dir": str(adapter_dir), **peak_memory(device),
               "args": vars(args)}
    write_results(out_dir, results)
    return results


if __name__ == "__main__":
    run_script(main, OFFLINE_COMMAND)
