"""QLoRA of Llama-2-7b (abhishek/llama-2-7b-hf-small-shards) on medical question-answer text, minilora alone.

The recipe: the base in 4-bit NF4, LoRA r=64, alpha=16, dropout 0.1 on q/v projections, gradient
checkpointing, batch 2 with 4 gradient-accumulation steps, lr 2e-4 constant (after 3% warmup), paged AdamW,
max grad norm 0.3, one epoch, a checkpoint and a log line every 75 steps. Rows are MedQuAD question/answer
pairs rendered as Llama-2 chat text "<s>[INST] question [/INST] answer </s>" and learned whole (`--chat`: read
as user/assistant messages in the tokenizer's chat template, or Llama-2's, with the loss on the answer only;
the loss is always the mean over every label token of a step, so long answers count as much per token as short
ones). It reports the
perplexity on held-out rows (exp of the mean loss, as transformers' run_clm does) before and after training,
and the peak memory: CUDA allocated memory on a GPU, the process's peak RSS on CPU.

    python examples/llama2_medical_qlora.py                                  # the recipe (GPU + hub)
    python examples/llama2_medical_qlora.py --model ../test-models/SmolLM2-135M-Instruct \\
        --data ../shared/data/medical_qa --max-train-samples 64 --max-seq-length 128   # CPU, offline

The data: a folder (or hub dataset) with train and test splits, or a single file (the hub's MedQuAD CSV),
of which --max-eval-samples rows are held out. Question/answer columns are matched case-insensitively.

Any supported decoder runs it (`--model` a Qwen2.5, SmolLM2, ... folder): with `--prompt-format auto` (default)
a checkpoint with a chat template other than Llama-2's learns each question/answer pair as a user/assistant
conversation rendered by that template; Llama-2 base models (no template) keep the recipe's [INST] text.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from common import (add_prompt_format_option, common_parser, conversation_text, peak_memory, print_metrics,
                    qlora_precision, run_script, split_rows, start, subsample, timed_evaluate, train_config,
                    uses_chat_template, write_results)

import minilora as ml
from minilora.data import Collator, causal_lm_dataset, chat_dataset, show_masking
from minilora.data.readers import Records
from minilora.train.loop import train

DEFAULT_MODEL = "abhishek/llama-2-7b-hf-small-shards"
SAFETENSORS_REVISION = "refs/pr/7"  # its main branch holds only pickled weights, which minilora never loads
# Llama-2's chat template (what chat_rows writes), for --chat with a base tokenizer that has no template of its own
LLAMA2_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                        "{{ bos_token + '[INST] ' + m['content'].strip()"
                        " + ' [/INST]' }}{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}"
                        "{% endfor %}")
OFFLINE = ("python examples/llama2_medical_qlora.py --model ../test-models/SmolLM2-135M-Instruct "
           "--data ../shared/data/medical_qa --max-train-samples 64 --max-seq-length 128")


def build_parser() -> argparse.ArgumentParser:
    parser = common_parser(__doc__.split("\n\n")[0], model=DEFAULT_MODEL,
                           data="keivalya/MedQuad-MedicalQnADataset", output_dir="out/llama2_medical_qlora",
                           epochs=1, lr=2e-4, batch_size=2, max_eval_samples=200,
                           lora_r=64, lora_alpha=16, lora_dropout=0.1)
    parser.add_argument("--revision", default=None,
                        help=f"hub revision of --model (default: {SAFETENSORS_REVISION}, the safetensors "
                             f"conversion, for {DEFAULT_MODEL}; main otherwise)")
    parser.add_argument("--question-column", default="question", help="column of the questions")
    parser.add_argument("--answer-column", default="answer", help="column of the answers")
    parser.add_argument("--chat", action="store_true",
                        help="read rows as chat messages (question: user, answer: assistant) in the tokenizer's "
                             "chat template (Llama-2's when it has none) and learn only the answers")
    parser.add_argument("--quantize", choices=["nf4", "fp4", "int8", "none"], default="nf4",
                        help="how the frozen base is stored (none: plain LoRA on a dense base)")
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"],
                        help="module names that get LoRA, or all-linear")
    add_prompt_format_option(parser)
    parser.add_argument("--max-seq-length", type=int, default=512,
                        help="rows are truncated to this many tokens")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--optim", default="paged_adamw_32bit",
                        choices=["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"],
                        help="optimizer (bitsandbytes' paged ones fall back to non-paged on CPU)")
    parser.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warmup")
    parser.add_argument("--max-grad-norm", type=float, default=0.3, help="gradient clipping norm")
    parser.add_argument("--save-steps", type=int, default=75, help="write a checkpoint every N steps")
    parser.add_argument("--logging-steps", type=int, default=75, help="log the training loss every N steps")
    return parser


def column(rows: list[dict], name: str, source: str) -> str:
    """The key of `rows` equal to `name` ignoring case (the hub's MedQuAD CSV says Question / Answer)."""
    for key in rows[0]:
        if key.lower() == name.lower():
            return key
    raise KeyError(f"{source} has no column {name!r} (columns: {sorted(rows[0])}): "
                   "pass --question-column / --answer-column")


def chat_rows(rows: list[dict], args, tokenizer, source: str) -> Records:
    """One conversation text per row with a non-empty answer: Llama-2 chat text in this tokenizer's BOS/EOS
    strings, or the checkpoint's chat template (see --prompt-format)."""
    question, answer = column(rows, args.question_column, source), column(rows, args.answer_column, source)
    chat_template = uses_chat_template(tokenizer, args.prompt_format)
    texts = [conversation_text([(row[question], row[answer])], tokenizer, chat_template) for row in rows
             if isinstance(row[answer], str) and row[answer].strip()]
    return Records(({"text": text} for text in texts), source=source)


def chat_messages(rows: list[dict], args, source: str) -> Records:
    """One user/assistant conversation per row with a non-empty answer, for `chat_dataset`."""
    question, answer = column(rows, args.question_column, source), column(rows, args.answer_column, source)
    return Records(({"messages": [{"role": "user", "content": row[question].strip()},
                                  {"role": "assistant", "content": row[answer].strip()}]}
                    for row in rows if isinstance(row[answer], str) and row[answer].strip()), source=source)


def tokenize(rows: list[dict], args, tokenizer, source: str):
    """Llama-2 chat text learned whole, or with --chat conversations learned on the answers only."""
    if args.chat:
        template = None if tokenizer.chat_template else LLAMA2_CHAT_TEMPLATE
        return chat_dataset(chat_messages(rows, args, source), tokenizer, max_length=args.max_seq_length,
                            chat_template=template)
    return causal_lm_dataset(chat_rows(rows, args, tokenizer, source), tokenizer, max_length=args.max_seq_length)


def held_out_metrics(model, features, collate, batch_size: int) -> dict[str, float]:
    """eval_loss (the mean over every held-out label token), its perplexity, runtime and throughput."""
    metrics = timed_evaluate(model, features, batch_size=batch_size, collate_fn=collate)
    return {**metrics, "perplexity": math.exp(metrics["eval_loss"])}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = start(args)

    revision = args.revision or (SAFETENSORS_REVISION if args.model == DEFAULT_MODEL else None)
    tokenizer = ml.load_tokenizer(args.model, revision=revision)
    train_rows, eval_rows = split_rows(args.data, args.max_eval_samples, args.seed)
    train_rows = subsample(train_rows, args.max_train_samples, args.seed)
    eval_rows = subsample(eval_rows, args.max_eval_samples, args.seed)
    train_data = tokenize(train_rows, args, tokenizer, f"{args.data} [train]")
    eval_data = tokenize(eval_rows, args, tokenizer, f"{args.data} [held out]")
    # Pad with EOS, as the recipe: Llama-2 has no pad token (some copies add "<pad>" beyond the embeddings).
    collate = Collator(pad_token_id=tokenizer.eos_token_id)
    prompt_format = "chat-template" if uses_chat_template(tokenizer, args.prompt_format) else "llama2"
    print(f"train rows {len(train_data)}, held-out rows {len(eval_data)}, prompt format {prompt_format}")
    print(f"the first training row, learned tokens in ⟦ ⟧:\n{show_masking(train_data[0], tokenizer)}")

    compute_dtype, bf16 = qlora_precision(device)
    quantize = None if args.quantize == "none" else ml.QuantConfig(quant_type=args.quantize,
                                                                   compute_dtype=compute_dtype)
    model = ml.from_pretrained(args.model, task="causal-lm", dtype=torch.float32, device=device,
                               quantize=quantize, revision=revision)
    ml.apply_lora(model, ml.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                       lora_dropout=args.lora_dropout, target_modules=args.target_modules))
    trainable, total = ml.trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    before = held_out_metrics(model, eval_data, collate, args.batch_size)
    print_metrics("before training (held-out)", before)

    config = train_config(args, gradient_accumulation_steps=args.gradient_accumulation_steps,
                          gradient_checkpointing=True, optim=args.optim, lr_scheduler="constant",
                          warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
                          save_steps=args.save_steps, logging_steps=args.logging_steps, bf16=bf16,
                          fp16=compute_dtype == torch.float16)  # GPUs without bf16: loss scaling
    summary = train(model, train_data, config, collate_fn=collate)
    print_metrics("training", summary)

    after = held_out_metrics(model, eval_data, collate, args.batch_size)
    memory = peak_memory(device)
    print_metrics("after training (held-out)", {**after, **memory})

    adapter_dir = ml.save_adapter(model, Path(args.output_dir) / "adapter")
    results = {"model": args.model, "data": args.data, "prompt_format": prompt_format, "train_rows": len(train_data),
               "eval_rows": len(eval_data), "trainable_parameters": trainable, "before": before,
               "train": summary, "after": after, **memory, "adapter_dir": str(adapter_dir)}
    write_results(args.output_dir, results)
    return results


if __name__ == "__main__":
    run_script(main, OFFLINE)
