"""QLoRA of Llama-2-7b on mlabonne/guanaco-llama2-1k (Llama-2 chat SFT), with minilora alone.

The recipe ("Fine-tune Llama 2 in a Colab notebook", M. Labonne): the base model in 4-bit NF4, LoRA
r=64, alpha=16, dropout 0.1 on the attention q/v projections (peft's Llama default), gradient checkpointing,
one epoch at batch 4, lr 2e-4 with a cosine schedule and 3% warmup, paged AdamW, max grad norm 0.3, weight
decay 0.001, full-text loss on "<s>[INST] question [/INST] answer </s>" rows. `--train-head` also trains
the LM head. It answers a few questions before and after training and, as a number, reports the perplexity
on rows held out from training before and after.

    python examples/llama2_qlora.py                                          # the recipe (GPU + hub)
    python examples/llama2_qlora.py --model ../test-models/SmolLM2-135M-Instruct \\
        --data ../shared/data/guanaco_llama2_1k --max-train-samples 200 --max-seq-length 256   # CPU, offline

Any supported decoder runs it (`--model` a Qwen2.5, SmolLM2, ... folder). The rows are Llama-2 chat text;
with `--prompt-format auto` (default) a model whose checkpoint has a chat template other than Llama-2's gets
each row split into its user/assistant turns and rendered with that template (so Qwen2.5 learns
"<|im_start|>user ... <|im_end|>" text, and is asked the questions the same way). Llama-2 base models have no
template and train on the rows as they are, with "<s>" / "</s>" rewritten to the tokenizer's own BOS/EOS
(`--prompt-format llama2` forces this for any model).

    python examples/llama2_qlora.py --model ../test-models/Qwen2.5-Coder-0.5B-Instruct \\
        --data ../shared/data/guanaco_llama2_1k --max-train-samples 200 --max-seq-length 256   # Qwen, CPU
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from common import (add_prompt_format_option, common_parser, conversation_text, peak_memory, print_metrics,
                    qlora_precision, question_prompt, run_script, split_rows, start, subsample, timed_evaluate,
                    train_config, uses_chat_template, write_results)

import minilora as ml
from minilora.data import Collator, causal_lm_dataset, show_masking
from minilora.train.loop import train

OFFLINE = ("python examples/llama2_qlora.py --model ../test-models/SmolLM2-135M-Instruct "
           "--data ../shared/data/guanaco_llama2_1k --max-train-samples 200 --max-seq-length 256")
QUESTIONS = ["What is a large language model?", "What is the capital of France?",
             "Give me three tips to stay healthy."]


def build_parser() -> argparse.ArgumentParser:
    parser = common_parser(__doc__.split("\n\n")[0], model="NousResearch/Llama-2-7b-hf",
                           data="mlabonne/guanaco-llama2-1k", output_dir="out/llama2_qlora", epochs=1,
                           lr=2e-4, batch_size=4, max_eval_samples=50, lora_r=64, lora_alpha=16, lora_dropout=0.1)
    parser.add_argument("--quantize", choices=["nf4", "fp4", "int8", "none"], default="nf4",
                        help="how the frozen base is stored (none: plain LoRA on a dense base)")
    parser.add_argument("--double-quant", action="store_true",
                        help="4-bit: quantize the scales too (recipe: off)")
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"],
                        help="module names that get LoRA, or all-linear")
    parser.add_argument("--train-head", action="store_true",
                        help="also train the LM head (saved in the adapter as modules_to_save; with tied "
                             "embeddings this trains the input embeddings too)")
    add_prompt_format_option(parser)
    parser.add_argument("--max-seq-length", type=int, default=1024,
                        help="rows are truncated to this many tokens")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--optim", default="paged_adamw_32bit",
                        choices=["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"],
                        help="optimizer (bitsandbytes' paged ones fall back to non-paged on CPU)")
    parser.add_argument("--lr-scheduler", default="cosine", choices=["constant", "linear", "cosine"],
                        help="learning-rate schedule after warmup")
    parser.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warmup")
    parser.add_argument("--weight-decay", type=float, default=0.001, help="AdamW weight decay")
    parser.add_argument("--max-grad-norm", type=float, default=0.3, help="gradient clipping norm")
    parser.add_argument("--logging-steps", type=int, default=25, help="log the training loss every N steps")
    parser.add_argument("--questions", nargs="+", default=QUESTIONS,
                        help="questions answered before and after training")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="answer length limit (greedy decoding)")
    return parser


def with_own_special_tokens(text: str, tokenizer) -> str:
    """Llama-2's literal "<s>" / "</s>" replaced by this tokenizer's BOS / EOS strings, if they differ."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    return text.replace("<s>", bos).replace("</s>", eos) if (bos, eos) != ("<s>", "</s>") else text


LLAMA2_TURN = re.compile(r"<s>\s*\[INST\](.*?)\[/INST\](.*?)</s>", re.S)


def llama2_turns(text: str) -> list[tuple[str, str]]:
    """The (user, assistant) turns of Llama-2 chat text "<s>[INST] q [/INST] a </s><s>[INST] q2 [/INST] ..."."""
    turns = LLAMA2_TURN.findall(text)
    if not turns or LLAMA2_TURN.sub("", text).strip():
        raise ValueError("expected Llama-2 chat text ('<s>[INST] question [/INST] answer </s>', one or more "
                         f"turns), got {text[:100]!r}; --prompt-format llama2 trains on the text as it is")
    return [(user.strip(), reply.strip()) for user, reply in turns]


def training_text(text: str, tokenizer, chat_template: bool) -> str:
    """A guanaco row as this model's training text: the row in the tokenizer's BOS/EOS, or (chat_template)
    its turns rendered with the checkpoint's chat template."""
    if not chat_template:
        return with_own_special_tokens(text, tokenizer)
    return conversation_text(llama2_turns(text), tokenizer, chat_template=True)


def answer(model, tokenizer, questions: list[str], max_new_tokens: int, device: torch.device,
           chat_template: bool = False) -> list[str]:
    """Greedy answers to each question, prompted in the format the recipe trains on."""
    model.eval()
    answers = []
    for question in questions:
        prompt = question_prompt(question, tokenizer, chat_template)
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        out = ml.generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def held_out_metrics(model, features, collate, batch_size: int) -> dict[str, float]:
    """eval_loss (the mean over every held-out label token), its perplexity, runtime and throughput."""
    metrics = timed_evaluate(model, features, batch_size=batch_size, collate_fn=collate)
    return {**metrics, "perplexity": math.exp(metrics["eval_loss"])}


def show_answers(title: str, questions: list[str], answers: list[str]) -> None:
    print(f"\n== {title} ==")
    for question, reply in zip(questions, answers, strict=True):
        print(f"Q: {question}\nA: {reply}\n")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = start(args)

    # Data: Llama-2 chat rows, tokenized whole (the loss covers question and answer, as in the recipe).
    tokenizer = ml.load_tokenizer(args.model)
    chat_template = uses_chat_template(tokenizer, args.prompt_format)
    train_rows, eval_rows = split_rows(args.data, args.max_eval_samples, args.seed)
    train_rows = subsample(train_rows, args.max_train_samples, args.seed)
    eval_rows = subsample(eval_rows, args.max_eval_samples, args.seed)

    def tokenize(rows):
        rows = [{"text": training_text(row["text"], tokenizer, chat_template)} for row in rows]
        return causal_lm_dataset(rows, tokenizer, max_length=args.max_seq_length)

    train_data, eval_data = tokenize(train_rows), tokenize(eval_rows)
    prompt_format = "chat-template" if chat_template else "llama2"
    print(f"prompt format: {prompt_format}; first training row:\n"
          f"{training_text(train_rows[0]['text'], tokenizer, chat_template)[:300]}")
    # Pad with EOS, as the recipe: Llama-2 has no pad token (some copies add "<pad>" beyond the embeddings).
    collate = Collator(pad_token_id=tokenizer.eos_token_id)
    print(f"train rows {len(train_data)}, held-out rows {len(eval_data)}")
    print(f"the first training row, learned tokens in ⟦ ⟧:\n{show_masking(train_data[0], tokenizer)}")

    # Model: the frozen base in 4 bits (non-quantized weights stay fp32), LoRA on top.
    compute_dtype, bf16 = qlora_precision(device)
    quantize = None if args.quantize == "none" else ml.QuantConfig(
        quant_type=args.quantize, double_quant=args.double_quant, compute_dtype=compute_dtype)
    model = ml.from_pretrained(args.model, task="causal-lm", dtype=torch.float32, device=device,
                               quantize=quantize)
    ml.apply_lora(model, ml.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                       lora_dropout=args.lora_dropout, target_modules=args.target_modules,
                                       modules_to_save=["lm_head"] if args.train_head else None))
    trainable, total = ml.trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    before = held_out_metrics(model, eval_data, collate, args.batch_size)
    before["answers"] = answer(model, tokenizer, args.questions, args.max_new_tokens, device, chat_template)
    print_metrics("before training (held-out)", {k: v for k, v in before.items() if k != "answers"})
    show_answers("answers before training", args.questions, before["answers"])

    config = train_config(args, gradient_accumulation_steps=args.gradient_accumulation_steps,
                          gradient_checkpointing=True, optim=args.optim, lr_scheduler=args.lr_scheduler,
                          warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                          max_grad_norm=args.max_grad_norm, logging_steps=args.logging_steps, bf16=bf16,
                          fp16=compute_dtype == torch.float16)  # GPUs without bf16: loss scaling
    summary = train(model, train_data, config, collate_fn=collate)
    print_metrics("training", summary)

    after = held_out_metrics(model, eval_data, collate, args.batch_size)
    after["answers"] = answer(model, tokenizer, args.questions, args.max_new_tokens, device, chat_template)
    print_metrics("after training (held-out)", {k: v for k, v in after.items() if k != "answers"})
    show_answers("answers after training", args.questions, after["answers"])

    adapter_dir = ml.save_adapter(model, Path(args.output_dir) / "adapter")
    results = {"model": args.model, "data": args.data, "prompt_format": prompt_format, "train_rows": len(train_data),
               "eval_rows": len(eval_data), "trainable_parameters": trainable, "questions": args.questions,
               "before": before, "train": summary, "after": after, **peak_memory(device),
               "adapter_dir": str(adapter_dir)}
    write_results(args.output_dir, results)
    return results


if __name__ == "__main__":
    run_script(main, OFFLINE)
