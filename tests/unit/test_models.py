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


def test_reference_with_another_vocabulary_is_refused(tiny_model_path, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cluster.models import check_reference

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["other text entirely"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="another vocabulary"):
        check_reference(tiny_model_path, str(tmp_path))
    assert any("not the policy's base" in n for n in check_reference(tiny_model_path, tiny_model_path))
