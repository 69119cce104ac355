"""bf16 products in fp32 on CPUs without fast bf16 kernels (minilora.ops.gemm): the same numbers as the native
bf16 path up to rounding, for whole QLoRA training steps, whichever CPU the tests run on."""
import pytest
import torch

import minilora as ml
from minilora.ops import gemm

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def test_gemm_dtype_follows_the_cpu(monkeypatch):
    for fast in (True, False):
        monkeypatch.setattr(gemm, "cpu_has_fast_bf16_gemm", lambda fast=fast: fast)
        cpu, rows = torch.device("cpu"), gemm.FP32_MIN_ROWS
        assert gemm.gemm_dtype(torch.bfloat16, cpu, rows) == (torch.bfloat16 if fast else torch.float32)
        assert gemm.gemm_dtype(torch.bfloat16, cpu, rows - 1) == torch.bfloat16  # decoding: the weight not copied
        assert gemm.gemm_dtype(torch.float32, cpu, rows) == torch.float32
        assert gemm.gemm_dtype(torch.float16, cpu, rows) == torch.float16
        assert gemm.gemm_dtype(torch.bfloat16, torch.device("meta"), rows) == torch.bfloat16  # only the CPU's


def test_linear_and_matmul_return_the_input_dtype_and_round_once(monkeypatch):
    monkeypatch.setattr(gemm, "cpu_has_fast_bf16_gemm", lambda: False)
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).bfloat16() for shape in [(17, 32), (16, 32), (16,)])
    exact = x.float() @ w.float().t() + b.float()
    y = gemm.linear(x.requires_grad_(), w, b)
    assert y.dtype == torch.bfloat16 and torch.equal(y, exact.bfloat16())
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(gemm.matmul(x.detach(), w.t()), (x.detach().float() @ w.float().t()).bfloat16())


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_qlora_step_is_the_same_with_fp32_or_native_bf16_products(tmp_path, monkeypatch, quantize):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    linear_dtypes = []
    original_linear = torch.nn.functional.linear

    def spy(x, *args, **kwargs):
        linear_dtypes.append(x.dtype)
        return original_linear(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    for fast in (True, False):
        monkeypatch.setattr(gemm, "cpu_has_fast_bf16_gemm", lambda fast=fast: fast)
        linear_dtypes.clear()
        model = ml.from_pretrained(tmp_path, quantize=quantize, dtype=torch.bfloat16)
        torch.manual_seed(2)  # the same random LoRA factors for both
        ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False)).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.dtype == torch.float32 for g in grads.values())
        results.append((loss.item(), grads))
        # every product of the bf16 model (LoRA layers, frozen bases, the head) in bf16, or all of them in fp32
        assert linear_dtypes and set(linear_dtypes) == {torch.bfloat16 if fast else torch.float32}
    (native_loss, native), (fp32_loss, fp32) = results
    assert abs(native_loss - fp32_loss) < 1e-2 * native_loss
    for name, grad in native.items():
        rel = ((fp32[name] - grad).norm() / grad.norm()).item()
        assert rel < 0.05, f"{name}: relative difference {rel:.3f}"
