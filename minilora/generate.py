"""Text generation with a KV cache: greedy, sampling (temperature / top-k / top-p) and beam search.

Works with any minilora model that follows the generation contract:
- decoder-only: `model(input_ids, attention_mask=, position_ids=, past_key_values=, use_cache=True)`;
- encoder-decoder (`is_encoder_decoder = True`): `model.encode(input_ids, attention_mask)` once, then
  `model(attention_mask=, decoder_input_ids=, encoder_outputs=, past_key_values=, use_cache=True)`;
- both: `model.reorder_cache(past_key_values, beam_idx)` for beam search;
- `model.stale_cache_length`: once a sequence grows past it, the cache is recomputed once from all
  tokens (longrope RoPE re-encodes every position with its long factors there, as transformers' Phi-3 does).
Token choices follow Hugging Face's `generate` so outputs match it token for token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minilora.checks import check_number
from minilora.models.base import PreTrainedModel

NEG_INF = -1.0e9  # HF's "impossible" beam score; kept identical so ties break the same way


class _Decoder:
    """Feeds tokens to the model step by step, owning the KV cache, the padding mask and positions."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 num_beams: int):
        self.model, self.cache = model, None
        self.seq2seq = model.is_encoder_decoder
        self.mask = None if attention_mask is None else attention_mask.repeat_interleave(num_beams, 0)
        if self.seq2seq:
            # Encode once per prompt, then give every beam its own copy, like HF.
            self.encoder_out = model.encode(input_ids, attention_mask=attention_mask).repeat_interleave(num_beams, 0)
            start = getattr(model.config, "decoder_start_token_id", None)
            if start is None:
                raise ValueError("model config has no decoder_start_token_id; encoder-decoder generation needs it")
            self.prompt = torch.full((self.encoder_out.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
        else:
            self.prompt = input_ids.repeat_interleave(num_beams, 0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the model on the new `tokens` (all of the prompt the first time); next-token logits in fp32."""
        if self.seq2seq:
            out = self.model(attention_mask=self.mask, decoder_input_ids=tokens, encoder_outputs=self.encoder_out,
                             past_key_values=self.cache, use_cache=True)
        else:
            if self.cache is None:
                self.ids = tokens
            else:
                self.ids = torch.cat((self.ids, tokens), dim=-1)
                if self.mask is not None:
                    self.mask = torch.cat((self.mask, self.mask.new_ones(tokens.shape)), dim=-1)
                stale = self.model.stale_cache_length
                if stale is not None and self.ids.shape[1] > stale >= self.ids.shape[1] - tokens.shape[1]:
                    self.cache, tokens = None, self.ids  # positions re-encoded from here on: recompute the cache
            positions = None  # no padding: the model counts positions from the cache length
            if self.mask is not None:
                # Left padding: real tokens count from 0 whatever the pad length.
                positions = (self.mask.long().cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
                positions = positions[:, -tokens.shape[1]:]
            out = self.model(tokens, attention_mask=self.mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.cache = self.model.reorder_cache(self.cache, beam_idx)
        if not self.seq2seq:
            self.ids = self.ids.index_select(0, beam_idx.to(self.ids.device))


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
             early_stopping: bool | str = False, eos_token_id: int | list[int] | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             length_penalty: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens per prompt row; returns a LongTensor (batch, length).

    Decoder-only models return prompt + new tokens (left-pad batched prompts and pass `attention_mask`);
    encoder-decoder models return decoder_start + new tokens. Rows that hit an EOS are padded with
    `pad_token_id`. `eos_token_id` / `pad_token_id` default to the model config's (pad falls back to EOS).
    Greedy when `do_sample` is False and `num_beams` is 1; sampling applies temperature, then top-k, then
    top-p, drawing from `generator` when given; `num_beams` > 1 runs beam search scored by summed log-probs
    divided by generated_length ** `length_penalty`, stopping as soon as `num_beams` hypotheses are done when
    `early_stopping` is True, when no running beam can beat them when False (or "never", as in HF).
    Runs under no_grad and leaves train/eval mode alone: call `model.eval()` first to disable dropout.
    """
    _check_args(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                early_stopping)
    check_number(length_penalty, "length_penalty")
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    eos = _as_id_tensor(eos_token_id, input_ids.device)
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
    if pad_token_id is None and eos is not None:
        pad_token_id = int(eos[0])
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"generate needs a minilora model (ml.from_pretrained), got {type(model).__name__}")
    if attention_mask is not None and not model.is_encoder_decoder and not attention_mask[:, -1].all():
        raise ValueError("attention_mask: a prompt ends with padding; decoder-only generation needs left padding "
                         "(tokenizer padding_side='left')")
    decoder = _Decoder(model, input_ids, attention_mask, num_beams)
    if num_beams > 1:
        return _beam_search(decoder, max_new_tokens, num_beams, eos, pad_token_id, early_stopping, length_penalty)
    return _greedy_or_sample(decoder, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad_token_id,
                             generator)


def _greedy_or_sample(decoder, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad_token_id, generator):
    sequences = decoder.prompt
    unfinished = torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)
    logits = decoder.step(sequences)
    for step in range(max_new_tokens):
        if do_sample:
            probs = F.softmax(warp_logits(logits, temperature, top_k, top_p), dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        if eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
            unfinished &= ~torch.isin(next_tokens, eos)
        sequences = torch.cat((sequences, next_tokens[:, None]), dim=-1)
        if step == max_new_tokens - 1 or not unfinished.any():
            break
        logits = decoder.step(next_tokens[:, None])
    return sequences


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, min_keep: int = 1) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed tokens get -inf. As HF's warpers."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth_best = logits.topk(min(max(top_k, min_keep), logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending: drop the low tail holding 1 - top_p of the mass
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -min_keep:] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _beam_search(decoder, max_new_tokens, num_beams, eos, pad_token_id, early_stopping, length_penalty):
    """HF's vectorised beam search: keep `num_beams` running beams and the `num_beams` best finished ones.

    Each step scores 2 * num_beams candidates (more with several EOS ids) so that enough of them do not end,
    continues the best unfinished ones and files the finished ones among the top num_beams into the
    finished set, scored by sum(log p) / generated_length ** length_penalty.
    """
    prompt = decoder.prompt
    batch, prompt_len = prompt.shape[0] // num_beams, prompt.shape[1]
    max_len, device = prompt_len + max_new_tokens, prompt.device
    n_candidates = max(2, 1 + (0 if eos is None else len(eos))) * num_beams
    fill = pad_token_id if pad_token_id is not None else -1

    running = torch.full((batch, num_beams, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = prompt.view(batch, num_beams, prompt_len)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = NEG_INF  # all beams start identical: only expand the first
    done = running.clone()
    done_scores = torch.full((batch, num_beams), NEG_INF, device=device)
    done_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    is_done = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    in_top_beams = torch.arange(n_candidates, device=device) < num_beams
    batch_offset = torch.arange(batch, device=device)[:, None] * num_beams

    logits = decoder.step(prompt)
    for cur_len in range(prompt_len, max_len):
        gen_len = cur_len + 1 - prompt_len
        log_probs = F.log_softmax(logits, dim=-1).view(batch, num_beams, -1) + running_scores[..., None]
        vocab = log_probs.shape[-1]
        cand_scores, cand_idx = log_probs.view(batch, -1).topk(n_candidates, dim=-1)
        cand_beam = cand_idx // vocab
        cand_seqs = _gather(running, cand_beam)
        cand_seqs[:, :, cur_len] = cand_idx % vocab
        cand_ends = torch.full_like(cand_beam, cur_len + 1 >= max_len, dtype=torch.bool)
        if eos is not None:
            cand_ends |= torch.isin(cand_seqs[:, :, cur_len], eos)

        # Continue the best candidates that did not end.
        alive_scores = cand_scores + cand_ends.float() * NEG_INF
        keep = alive_scores.topk(num_beams, dim=-1).indices
        running, running_scores = _gather(cand_seqs, keep), _gather(alive_scores, keep)
        parent = _gather(cand_beam, keep)

        # File ended candidates among the top num_beams into the finished set, if they beat its worst.
        just_done = cand_ends & in_top_beams
        new_scores = cand_scores / gen_len**length_penalty
        new_scores = new_scores + (is_done.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG_INF
        new_scores = new_scores + (~can_improve).float() * NEG_INF
        new_scores = new_scores + (~just_done).float() * NEG_INF
        merged_scores = torch.cat((done_scores, new_scores), dim=1)
        best = merged_scores.topk(num_beams, dim=-1).indices
        done = _gather(torch.cat((done, cand_seqs), dim=1), best)
        done_scores = _gather(merged_scores, best)
        done_lengths = _gather(torch.cat((done_lengths, torch.full_like(cand_beam, gen_len)), dim=1), best)
        is_done = _gather(torch.cat((is_done, just_done), dim=1), best)

        # Stop once no running beam can beat the worst finished one (HF's heuristic, see its docs).
        best_len = max_len - prompt_len if early_stopping == "never" and length_penalty > 0 else gen_len
        best_possible = running_scores[:, :1] / best_len**length_penalty
        worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, NEG_INF)
        can_improve &= (best_possible > worst_done).any(dim=-1, keepdim=True)
        all_full = is_done.all() and early_stopping is True
        if not can_improve.any() or all_full or cand_ends.all():
            break
        decoder.reorder((parent + batch_offset).flatten())
        logits = decoder.step(running[:, :, cur_len].reshape(-1, 1))

    out_len = prompt_len + int(done_lengths[:, 0].max())
    return done[:, 0, :out_len]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, j], ...] for (batch, beams, ...) tensors."""
    return torch.take_along_dim(x, idx.view(*idx.shape, *([1] * (x.dim() - 2))), dim=1)


def _as_id_tensor(ids: int | list[int] | None, device) -> torch.Tensor | None:
    """Token id(s) as a 1-D LongTensor; None when there are none (None or an empty list)."""
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _check_args(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                early_stopping):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a (batch, seq) LongTensor, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} of shape {getattr(input_ids, 'shape', '')}")
    if not input_ids.numel():
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): every prompt needs at least one "
                         "token (e.g. the tokenizer's BOS token)")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if do_sample and num_beams > 1:
        raise ValueError("do_sample with num_beams > 1 (beam sampling) is not supported")
    check_number(temperature, "temperature", low=0, low_open=True)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int or None, got {top_k!r}")
    check_number(top_p, "top_p", low=0, high=1, low_open=True, or_none=True)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
