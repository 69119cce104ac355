"""The code paths that only run on a GPU, checked on the CPU: which device a run resolves to (torchrun's
LOCAL_RANK), which kernel a layer picks on CUDA, and the checks that guard the CUDA-only bitsandbytes calls.
The kernels themselves run in ../shared/tools/gpu_check.sh on a real GPU."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minilora as ml
from minilora.quant import bnb as quant_bnb
from minilora.quant import layers as quant_layers
from minilora.device import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import common  # noqa: E402

train_module = importlib.import_module("minilora.train.loop")  # minilora.train.loop is the function


@pytest.fixture
def four_gpus(monkeypatch):
    """torch.cuda as a 4-GPU machine sees it (nothing is run on those devices)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    set_to = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(torch.device(d)))
    return set_to


# ---------------------------------------------------------------- device resolution

def test_the_default_device_is_cuda_when_available_else_cpu(monkeypatch, four_gpus):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device() == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:3") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu") == resolve_device(None)


@pytest.mark.parametrize("resolve", [resolve_device, common.resolve_device], ids=["minilora", "examples"])
def test_under_torchrun_a_bare_cuda_is_this_ranks_gpu(monkeypatch, four_gpus, resolve):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve(None) == torch.device("cuda", 2) == resolve("cuda")
    assert resolve("cuda:1") == torch.device("cuda", 1) and resolve("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(ValueError, match="LOCAL_RANK='4'.*4 visible"):
        resolve(None)


def test_train_and_the_examples_resolve_the_same_device_before_loading(monkeypatch, four_gpus):
    """train's device set-up (single process started by torchrun: WORLD_SIZE=1, LOCAL_RANK=1) gives the device
    the examples load the model on, and makes it the current CUDA device."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    device, rank, world, created = train_module._setup_distributed(ml.TrainConfig(device=None))
    assert (device, rank, world, created) == (torch.device("cuda", 1), 0, 1, False)
    assert four_gpus == [torch.device("cuda", 1)]
    assert common.resolve_device(None) == device
    args = common.common_parser("x", model="m", data="d", output_dir="o").parse_args([])
    assert common.train_config(args).device == "cuda:1"


def test_from_pretrained_loads_on_the_shared_default_device(monkeypatch):
    from minilora.io import load as loading

    asked = []

    def spy(device=None):
        asked.append(device)
        return torch.device("cpu")
    monkeypatch.setattr(loading, "resolve_device", spy)
    model_dir = Path(os.environ.get("MINILORA_TEST_MODELS", "/nonexistent")) / "all-MiniLM-L6-v2"
    if not (model_dir / "config.json").is_file():
        pytest.skip(f"no test checkpoint at {model_dir} (set MINILORA_TEST_MODELS)")
    model = ml.from_pretrained(model_dir)
    assert asked == [None] and next(model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------- bitsandbytes: version, blocksize

def test_an_old_bitsandbytes_is_refused_at_import_with_the_version_needed(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from minilora import quant

    monkeypatch.setattr(bnb, "__version__", "0.45.5")
    quant.import_bitsandbytes.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"bitsandbytes >= 0\.46.*found 0\.45\.5"):
            quant.quantize_linear(torch.randn(8, 64), None, ml.QuantConfig("nf4"))
    finally:
        quant.import_bitsandbytes.cache_clear()
    monkeypatch.setattr(bnb, "__version__", "0.46.0.dev0")
    assert quant.bnb_version() == (0, 46)
    quant.import_bitsandbytes.cache_clear()


def test_blocksize_32_on_cuda_needs_bitsandbytes_0_49(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from minilora import quant

    monkeypatch.setattr(quant_bnb, "bnb_version", lambda module=None: (0, 48))
    with pytest.raises(ValueError, match=r"QuantConfig.blocksize=32 needs bitsandbytes >= 0\.49 on CUDA"):
        quant.quantize_linear(torch.randn(8, 64), None, ml.QuantConfig("nf4", blocksize=32), device="cuda")
    quant.check_blocksize(64, torch.device("cuda"))  # other sizes and devices pass
    quant.check_blocksize(32, torch.device("cpu"))
    on_cpu = quant.quantize_linear(torch.randn(8, 64), None, ml.QuantConfig("nf4", blocksize=32))
    assert on_cpu.weight.quant_state.blocksize == 32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA, the default device: refused at once
    with pytest.raises(ValueError, match=r"QuantConfig.blocksize=32 needs bitsandbytes >= 0\.49"):
        ml.QuantConfig("nf4", blocksize=32)
    assert ml.QuantConfig("int8", blocksize=32).blocksize == 32  # int8 has no blocks
    monkeypatch.setattr(quant_bnb, "bnb_version", lambda module=None: (0, 49))
    quant.check_blocksize(32, torch.device("cuda"))
    assert ml.QuantConfig("nf4", blocksize=32).blocksize == 32


# ---------------------------------------------------------------- which kernel a quantized layer runs

def test_4bit_decoding_on_cuda_goes_through_matmul_4bit():
    from minilora.quant.layers import DECODE_MAX_ROWS, decodes_with_matmul_4bit

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert decodes_with_matmul_4bit(cuda, 1, needs_grad=False)
    assert decodes_with_matmul_4bit(cuda, DECODE_MAX_ROWS, False)
    assert not decodes_with_matmul_4bit(cuda, DECODE_MAX_ROWS + 1, False)  # prefill, training batches
    assert not decodes_with_matmul_4bit(cuda, 1, needs_grad=True)  # minilora's backward
    assert not decodes_with_matmul_4bit(cpu, 1, False)  # the CPU keeps dequantize + GEMM


@pytest.fixture
def bnb_matmul_on_cpu(monkeypatch):
    """The CUDA routing, run on the CPU: bitsandbytes' CPU kernels stand in for the CUDA ones."""
    pytest.importorskip("bitsandbytes")
    from minilora import quant

    monkeypatch.setattr(quant_layers, "BNB_MATMUL_DEVICES", ("cuda", "cpu"))
    calls = []
    bnb = quant.import_bitsandbytes()
    for name in ("matmul_4bit", "matmul"):
        real = getattr(bnb, name)
        monkeypatch.setattr(bnb, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_the_4bit_decode_route_calls_matmul_4bit_like_linear4bit(bnb_matmul_on_cpu, compute_dtype):
    from minilora import quant

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 128, generator=g) * 0.05, torch.randn(96, generator=g) * 0.1
    layer = quant.quantize_linear(w, b, ml.QuantConfig("nf4", compute_dtype=compute_dtype))
    x = torch.randn(2, 1, 128, generator=g)  # two sequences, one new token each
    with torch.no_grad():
        routed = layer(x)
    assert bnb_matmul_on_cpu == ["matmul_4bit"] and routed.dtype == x.dtype and routed.shape == (2, 1, 96)
    dense = x.to(compute_dtype) @ layer.dequantize(compute_dtype).t() + b.to(compute_dtype)
    torch.testing.assert_close(routed, dense.float(), rtol=2e-2, atol=2e-2)
    layer(x.requires_grad_()).sum().backward()  # with a gradient to compute: minilora's own path
    with torch.no_grad():
        layer(torch.randn(2, quant.DECODE_MAX_ROWS, 128))  # a prefill of 2 x 16 rows: minilora's own path
    assert bnb_matmul_on_cpu == ["matmul_4bit"] and x.grad is not None


def test_int8_on_cuda_runs_llm_int8_with_the_configured_threshold(bnb_matmul_on_cpu):
    """On CUDA the int8 layer is bitsandbytes' Linear8bitLt: LLM.int8 with outlier columns (here run by the
    CPU kernels, which Linear8bitLt runs in eval mode); int8_threshold decides which columns are outliers."""
    bnb = pytest.importorskip("bitsandbytes")
    from minilora import quant

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g) * 0.05, torch.randn(48, generator=g) * 0.1
    x = torch.randn(3, 5, 64, generator=g)
    x[..., 7] *= 40  # an outlier feature column
    outs = {}
    for threshold in (0.0, 6.0):
        config = ml.QuantConfig("int8", compute_dtype=torch.float32, int8_threshold=threshold)
        ours = quant.quantize_linear(w, b, config)
        assert ours.threshold == threshold
        ref = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=threshold)
        ref.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        ref.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
        ref.eval()
        with torch.no_grad():
            outs[threshold] = ours(x)
            torch.testing.assert_close(outs[threshold], ref(x), rtol=0, atol=0)
        xg = x.clone().requires_grad_()
        ours(xg).sum().backward()  # the input gradient through the dequantized weight
        torch.testing.assert_close(xg.grad, torch.ones(3, 5, 48) @ ours.dequantize(torch.float32))
    exact = x @ w.t() + b
    assert rel(outs[6.0], exact) < rel(outs[0.0], exact)  # the outlier column kept in 16 bits
    assert "matmul" in bnb_matmul_on_cpu and "matmul_4bit" not in bnb_matmul_on_cpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_lora_layers_leave_the_cuda_kernels_to_their_quantized_base(bnb_matmul_on_cpu, quant_type):
    """LoRA's fused path computes a quantized base itself by dequantizing; where the base would run a
    bitsandbytes kernel (CUDA decoding, CUDA int8) the base's own forward runs instead, LoRA added after."""
    from minilora import quant

    g = torch.Generator().manual_seed(0)
    base = quant.quantize_linear(torch.randn(32, 64, generator=g) * 0.05, None,
                                 ml.QuantConfig(quant_type, compute_dtype=torch.bfloat16))
    layer = ml.LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(1, 1, 64, generator=g, dtype=torch.bfloat16)  # a bf16 model decoding one token
    with torch.no_grad():
        out = layer(x)
        expected = base(x) + layer.scaling * (x.float() @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    assert bnb_matmul_on_cpu == 2 * ["matmul_4bit" if quant_type == "nf4" else "matmul"]
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- chunked cross-entropy

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_gives_the_same_bits_in_gpu_sized_chunks(monkeypatch, dtype):
    """A GPU reads the logits in DEVICE_CHUNK_ELEMENTS chunks: the same loss and gradient, bit for bit, as the
    CPU's cache-sized chunks (rows are independent); a loss scale (accumulation) applies on both paths."""
    from minilora.ops import cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(300, 1000) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = -100
    results, sizes = [], (cross_entropy.CHUNK_ELEMENTS, cross_entropy.DEVICE_CHUNK_ELEMENTS)
    assert sizes[1] // 1000 >= 300 > sizes[0] // 1000  # one chunk vs several
    for chunk in sizes:
        monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", chunk)
        loss = cross_entropy.cross_entropy(logits, targets)
        results.append((loss, *torch.autograd.grad(loss / 4, logits)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    expected = torch.func.grad(lambda x: F.cross_entropy(x.float(), targets) / 4)(logits.detach())
    torch.testing.assert_close(results[0][1].float(), expected.float(), rtol=1e-2, atol=1e-6)


# ---------------------------------------------------------------- loading onto a GPU

def test_checkpoint_tensors_go_to_a_gpu_in_few_pinned_pieces(tmp_path, monkeypatch):
    """To the CPU a converted tensor is read a few rows at a time (memory); to CUDA it is read in large
    pieces into pinned memory (asynchronous copies). The meta device stands in for the GPU's allocation."""
    from minilora.io import load as loading
    from minilora.io.safetensors_file import Checkpoint, SafetensorsFile, save_safetensors

    save_safetensors({"w": torch.randn(4096, 1024)}, tmp_path / "model.safetensors")  # 16 MiB of fp32
    reads = []
    real_read = SafetensorsFile.read

    def spy(self, key, start=None, stop=None, pin_memory=False):
        reads.append((key, start, stop, pin_memory))
        return real_read(self, key, start, stop)  # pinning itself needs a GPU
    monkeypatch.setattr(SafetensorsFile, "read", spy)
    with Checkpoint(tmp_path) as checkpoint:
        on_cpu = loading._read_as(loading._lazy_for(checkpoint, "w", torch.device("cpu")), torch.device("cpu"),
                                  torch.bfloat16)
        assert len(reads) == 16 * 2**20 // loading.READ_CHUNK_BYTES and not any(r[3] for r in reads)
        torch.testing.assert_close(on_cpu, checkpoint.read("w").to(torch.bfloat16), rtol=0, atol=0)
        reads.clear()
        lazy = loading._lazy_for(checkpoint, "w", torch.device("cuda"))
        assert lazy.pin_memory
        out = loading._read_as(lazy, torch.device("meta"), torch.bfloat16)
        assert [(r[0], r[1], r[3]) for r in reads] == [("w", 0, True)] and reads[0][2] >= 4096  # one piece
        assert out.shape == (4096, 1024) and out.dtype == torch.bfloat16


def test_a_saved_int8_layer_loads_with_the_checkpoints_threshold():
    pytest.importorskip("bitsandbytes")
    from minilora import quant
    from minilora.quant import format as quant_format

    saved = ml.QuantConfig("int8", int8_threshold=4.0)
    layer = quant.quantize_linear(torch.randn(16, 64), None, saved)
    config = quant_format.quant_config_from_dict(quant_format.quant_config_to_dict(saved))  # config.json
    again = quant.load_prequantized_linear(dict(layer.state_dict()), 64, 16, config)
    assert layer.threshold == again.threshold == 4.0 and "threshold=4" in repr(again)
