"""Instruction QA with google/flan-t5-large on OpenOrca: LoRA on an 8-bit (or NF4) base, with minilora alone.

The recipe: the prompt is the row's system prompt followed by its question, the target its response;
examples whose prompt is over the 512-token input limit are dropped (and counted). The frozen base is in
8-bit (--quantize int8) or 4-bit NF4, with LoRA r=16, alpha=32, dropout 0.05 on the attention q/v
projections, gradient checkpointing, 3 epochs at lr 1e-3. --adapter continues from an existing adapter
instead of a fresh one. It reports the loss on held-out rows before and after training, and generations
(beam search: --num-beams, --early-stopping, --max-new-tokens) for a few of them.

    python examples/flan_t5_qlora.py                                         # the recipe (GPU + hub)
    python examples/flan_t5_qlora.py --model ../test-models/t5-random-flan-small-shape \\
        --data ../shared/data/openorca --max-train-samples 200 --max-target-length 64   # CPU, offline

From the hub, OpenOrca is read from one of its parquet files (--data-file: the GPT-4 completions by default);
a local --data is a file or a folder of split files. Without a test split, --max-eval-samples rows are held
out of the training rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import (common_parser, hold_out, peak_memory, print_metrics, run_script, start, subsample, timed_evaluate,
                    train_config, write_results)

import minilora as ml
from minilora.data import Collator, load_records, seq2seq_dataset
from minilora.data.readers import Records
from minilora.io.hub import resolve_files
from minilora.train.loop import train

OFFLINE = ("python examples/flan_t5_qlora.py --model ../test-models/t5-random-flan-small-shape "
           "--data ../shared/data/openorca --max-train-samples 200 --max-target-length 64")


def build_parser() -> argparse.ArgumentParser:
    parser = common_parser(__doc__.split("\n\n")[0], model="google/flan-t5-large", data="Open-Orca/OpenOrca",
                           output_dir="out/flan_t5_qlora", epochs=3, lr=1e-3, batch_size=8,
                           max_eval_samples=100, lora_r=16, lora_alpha=32, lora_dropout=0.05)
    parser.add_argument("--data-file", default="1M-GPT4-Augmented.parquet",
                        help="with a hub dataset id: the data file to read")
    parser.add_argument("--quantize", choices=["int8", "nf4", "none"], default="int8",
                        help="how the frozen base is stored (none: plain LoRA on a dense base)")
    parser.add_argument("--adapter", default=None,
                        help="start from this adapter (folder or hub id; its LoRA settings replace --lora-*)")
    parser.add_argument("--target-modules", nargs="+", default=["q", "v"],
                        help="module names that get LoRA, or all-linear")
    parser.add_argument("--max-source-length", type=int, default=512,
                        help="prompts longer than this many tokens are dropped (T5's input limit)")
    parser.add_argument("--max-target-length", type=int, default=512,
                        help="responses are cut to this many tokens")
    parser.add_argument("--num-generations", type=int, default=3, help="held-out prompts to generate for")
    parser.add_argument("--num-beams", type=int, default=4, help="beam search width (1: greedy)")
    parser.add_argument("--early-stopping", action="store_true",
                        help="stop beam search once --num-beams finished candidates exist")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit")
    return parser


def precision(device: torch.device) -> tuple[torch.dtype, bool]:
    """(compute dtype of the quantized layers, bf16 autocast): bf16 on GPUs that have it, fp32 otherwise
    (T5 overflows in fp16)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, True
    return torch.float32, False


def read_rows(data: str, data_file: str) -> Records:
    """A local file, a local folder (its train split, else its one data file), or `data_file` of a hub
    dataset (OpenOrca's files are not named after splits)."""
    if not Path(data).exists():
        return load_records(resolve_files(data, [data_file], repo_type="dataset")[0])
    try:
        return load_records(data, split="train")
    except FileNotFoundError:
        return load_records(data)


def prompt_rows(rows: list[dict]) -> list[dict]:
    """{"source": system prompt + question, "target": response} per row."""
    def prompt(row: dict) -> str:
        system = (row.get("system_prompt") or "").strip()
        return f"{system}\n\n{row['question']}" if system else row["question"]

    return [{"source": prompt(row), "target": row["response"]} for row in rows]


def generations(model, tokenizer, rows: list[dict], args, device: torch.device) -> list[dict]:
    """The model's response to each prompt next to the reference."""
    model.eval()
    out = []
    for row in rows:
        enc = tokenizer(row["source"], return_tensors="pt").to(device)
        ids = ml.generate(model, enc["input_ids"], attention_mask=enc["attention_mask"],
                          num_beams=args.num_beams, early_stopping=args.early_stopping,
                          max_new_tokens=args.max_new_tokens)
        out.append({"prompt": row["source"], "reference": row["target"],
                    "generated": tokenizer.decode(ids[0], skip_special_tokens=True).strip()})
    return out


def show(title: str, items: list[dict]) -> None:
    print(f"\n== {title} ==")
    for item in items:
        print(f"prompt:    {item['prompt'][:300]!r}\nreference: {item['reference'][:200]!r}\n"
              f"generated: {item['generated'][:200]!r}\n")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = start(args)

    # Data: prompts over the input limit are dropped, not truncated, so no question is learned cut off.
    tokenizer = ml.load_tokenizer(args.model)
    train_rows, eval_rows = hold_out(prompt_rows(read_rows(args.data, args.data_file)),
                                       args.max_eval_samples, args.seed)
    train_rows = subsample(train_rows, args.max_train_samples, args.seed)

    def tokenize(rows):
        return seq2seq_dataset(rows, tokenizer, max_source_length=args.max_source_length,
                               max_target_length=args.max_target_length, drop_long=True)

    train_data, eval_data = tokenize(train_rows), tokenize(eval_rows)
    print(f"train rows {len(train_data)} ({train_data.num_dropped} dropped as longer than "
          f"{args.max_source_length} tokens), held-out rows {len(eval_data)} "
          f"({eval_data.num_dropped} dropped)")
    collate = Collator(pad_token_id=tokenizer.pad_token_id)
    shown = [row for row in eval_rows if len(tokenizer.encode(row["source"])) <= args.max_source_length]
    shown = shown[:args.num_generations]

    compute_dtype, bf16 = precision(device)
    quantize = None if args.quantize == "none" else ml.QuantConfig(quant_type=args.quantize,
                                                                   compute_dtype=compute_dtype)
    model = ml.from_pretrained(args.model, task="seq2seq", dtype=torch.float32, device=device,
                               quantize=quantize)
    if args.adapter:
        ml.load_adapter(model, args.adapter)  # its LoRA layers train on
    else:
        ml.apply_lora(model, ml.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                           lora_dropout=args.lora_dropout,
                                           target_modules=args.target_modules))
    trainable, total = ml.trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    before = timed_evaluate(model, eval_data, batch_size=args.batch_size, collate_fn=collate)
    before["generations"] = generations(model, tokenizer, shown, args, device)
    print_metrics("before training (held-out)", {k: v for k, v in before.items() if k != "generations"})
    show("generations before training", before["generations"])

    config = train_config(args, gradient_checkpointing=True, bf16=bf16)
    summary = train(model, train_data, config, collate_fn=collate)
    print_metrics("training", summary)

    after = timed_evaluate(model, eval_data, batch_size=args.batch_size, collate_fn=collate)
    after["generations"] = generations(model, tokenizer, shown, args, device)
    print_metrics("after training (held-out)", {k: v for k, v in after.items() if k != "generations"})
    show("generations after training", after["generations"])

    adapter_dir = ml.save_adapter(model, Path(args.output_dir) / "adapter")
    results = {"model": args.model, "data": args.data, "train_rows": len(train_data),
               "train_rows_dropped": train_data.num_dropped, "eval_rows": len(eval_data),
               "eval_rows_dropped": eval_data.num_dropped, "trainable_parameters": trainable,
               "start_adapter": args.adapter, "before": before, "train": summary, "after": after,
               **peak_memory(device), "adapter_dir": str(adapter_dir)}
    write_results(args.output_dir, results)
    return results


if __name__ == "__main__":
    run_script(main, OFFLINE)
