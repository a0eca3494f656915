"""Model loading and export helpers, without Ray or DeepSpeed."""

import pytest
import torch

from cluster.models import adapter_state_dict, load_causal_lm, merge_lora_state_dict
from rlhf.config import ConfigError, ModelConfig


def test_one_dtype_for_model_and_adapters(tiny_model_path):
    cfg = ModelConfig(dtype="bf16")
    cfg.lora.enabled = True
    model = load_causal_lm(tiny_model_path, cfg, trainable=True, use_gpu=False)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}  # no fp32 adapters next to bf16 weights
    ids = torch.tensor([[1, 2, 3]])
    model(input_ids=ids).logits.float().sum().backward()  # no dtype mismatch


def test_merge_equals_peft_merge_and_unload(tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    sd = {k: v.clone() for k, v in peft_model.state_dict().items()}
    ours = merge_lora_state_dict(sd, scaling=8 / 4)
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6), k
    adapters = adapter_state_dict(sd)
    assert adapters and all(".default." not in k for k in adapters)


def test_four_bit_needs_a_gpu(tiny_model_path):
    cfg = ModelConfig()
    cfg.lora.enabled = cfg.lora.load_in_4bit = True
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_causal_lm(tiny_model_path, cfg, trainable=True, use_gpu=False)


def test_qlora_export_unpacks_the_4bit_weights(tiny_model_path, tmp_path):
    """A QLoRA state dict holds packed 4-bit weights and their quantisation state: the
    export dequantises them before the merge, and the merged model gives the QLoRA
    model's logits. Runs where bitsandbytes is installed (on its CPU backend without a
    GPU)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cluster.models import export_hf, load_tokenizer

    cfg = ModelConfig(dtype="bf16")
    cfg.lora.enabled = cfg.lora.load_in_4bit = True
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.bfloat16, device_map=dev,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             target_modules=list(cfg.lora.target_modules),
                                             task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # bf16 adapters, as load_causal_lm makes them
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    assert any(".quant_state.bitsandbytes__nf4" in k for k in sd)
    export_hf(sd, tiny_model_path, tmp_path, cfg, load_tokenizer(tiny_model_path))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).to(dev)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).to(dev)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 3]], device=dev)
    with torch.no_grad():
        want, got, before = (m(input_ids=ids).logits.float() for m in (model, merged, base))
    assert (got - want).abs().max() < 0.05 < (before - want).abs().max()  # bf16 rounding


def test_reference_with_another_vocabulary_is_refused(tiny_model_path, other_tokenizer_dir):
    from cluster.models import check_reference

    with pytest.raises(ConfigError, match="another vocabulary"):
        check_reference(tiny_model_path, other_tokenizer_dir)
    assert any("not the policy's base" in n for n in check_reference(tiny_model_path, tiny_model_path))


def test_qlora_export_merges_into_the_original_base_weights(tmp_path):
    """A QLoRA state dict (packed 4-bit base weight plus its quantisation state, as
    bitsandbytes leaves it) exports as the base folder's own weight + scaling * B @ A, in
    the model's dtype; no bitsandbytes needed (the packed bytes are never read)."""
    import torch
    from safetensors.torch import save_file

    from cluster.models import merge_lora_state_dict, with_original_base

    w = torch.randn(4, 6)
    save_file({"lin.weight": w, "other.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    a, b = torch.randn(2, 6), torch.randn(4, 2)
    sd = {"base_model.model.lin.base_layer.weight": torch.zeros(12, 1, dtype=torch.uint8),
          "base_model.model.lin.base_layer.weight.absmax": torch.ones(1),
          "base_model.model.lin.base_layer.weight.quant_map": torch.ones(16),
          "base_model.model.lin.base_layer.weight.quant_state.bitsandbytes__nf4":
              torch.zeros(3, dtype=torch.uint8),
          "base_model.model.lin.lora_A.default.weight": a,
          "base_model.model.lin.lora_B.default.weight": b,
          "base_model.model.other.weight": torch.ones(2)}
    out = merge_lora_state_dict(with_original_base(sd, str(tmp_path), "bfloat16"), 0.5)
    assert set(out) == {"lin.weight", "other.weight"}
    expected = (w.to(torch.bfloat16).float() + 0.5 * b @ a).to(torch.bfloat16)
    assert out["lin.weight"].dtype == torch.bfloat16
    assert torch.equal(out["lin.weight"], expected)
    plain = {"base_model.model.lin.weight": w}
    assert with_original_base(plain, str(tmp_path), "float32") is plain
