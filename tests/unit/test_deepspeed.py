import pytest

from cluster.deepspeed import frozen_config, lr_lambda, train_config


def test_batch_arithmetic_and_precision():
    cfg = train_config(zero_stage=2, dtype="bf16", micro_batch_size=4, grad_accum=2,
                       world_size=8, max_grad_norm=1.0)
    assert cfg["train_batch_size"] == 64
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["communication_data_type"] == "fp32"
    assert "optimizer" not in cfg  # torch AdamW passed in as a client optimizer


def test_offload_declares_cpu_adam():
    cfg = train_config(zero_stage=3, dtype="fp32", micro_batch_size=1, grad_accum=1,
                       world_size=2, max_grad_norm=0.0, offload_optimizer=True,
                       offload_params=True, learning_rate=1e-5)
    z = cfg["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert cfg["optimizer"]["params"]["lr"] == 1e-5


def test_frozen_reference_is_sharded_only_under_zero3():
    assert frozen_config(zero_stage=2, dtype="fp32", micro_batch_size=2,
                         world_size=2)["zero_optimization"]["stage"] == 0
    assert frozen_config(zero_stage=3, dtype="fp32", micro_batch_size=2,
                         world_size=2)["zero_optimization"]["stage"] == 3
    # offload needs ZeRO-3: a frozen model offloaded is sharded beside a ZeRO-2 policy
    z = frozen_config(zero_stage=2, dtype="fp32", micro_batch_size=2, world_size=2,
                      offload_params=True)["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu"


def test_schedule_shapes():
    f = lambda s, kind: lr_lambda(s, total_steps=10, warmup_steps=2, schedule=kind)  # noqa: E731
    assert f(0, "cosine") == pytest.approx(1 / 3) and f(1, "cosine") == pytest.approx(2 / 3)
    assert f(2, "cosine") == pytest.approx(1.0) and f(10, "cosine") == pytest.approx(0.0)
    assert f(6, "linear") == pytest.approx(0.5) and f(6, "cosine") == pytest.approx(0.5)
    assert f(9, "constant") == 1.0


def test_muon_module_loads_without_compiling_and_torch_compile_comes_back():
    """In a fresh interpreter (the module may be loaded here already): DeepSpeed's Muon
    module is importable after it, Inductor was never loaded, torch.compile is torch's."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch\n"
        "real = torch.compile\n"
        "from cluster.deepspeed import _muon_module_without_compiling as f\n"
        "f()\n"
        "assert torch.compile is real\n"
        "assert 'deepspeed.runtime.zero.muon.muon_optimizer' in sys.modules\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules\n"
        "from deepspeed.runtime.zero.muon.original_muon import muon_update\n"
        "assert not hasattr(muon_update, '_torchdynamo_orig_callable')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=str(Path(__file__).parents[2]))
    assert out.returncode == 0, out.stderr[-2000:]
