"""CPU always; CUDA too where a GPU is present (run on the GPU machine: see the closing note)."""

import pytest
import torch
import torch.nn.functional as F

import actsparse as A
from actsparse.eval import SparsityMonitor

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RECIPE = {A.TargetScope(patterns=[".*up_proj.*", ".*gate_proj.*"]): 0.3, A.TargetScope(patterns=[".*down_proj.*"]): 0.5}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparsify_forward_measure_save_load(device, dtype, calib_data, tmp_path):
    from helpers import make_tiny_llama

    model = make_tiny_llama().to(device=device, dtype=dtype)
    A.sparsify_activations(model, calib_data, RECIPE, progress=False)  # CPU data, moved by the engine
    sl = model.model.layers[0].mlp.down_proj
    assert sl.act_threshold.device.type == device and sl.act_threshold.dtype == torch.float32
    x = torch.randn(3, 7, sl.in_features, device=device, dtype=dtype)
    ref = F.linear(torch.where(x.abs() > sl.act_threshold.to(dtype), x, torch.zeros_like(x)), sl.weight)
    assert torch.equal(sl(x), ref)
    with SparsityMonitor(model) as mon, torch.no_grad():
        for b in calib_data:
            assert torch.isfinite(model(b.to(device)).logits).all()
    for n, s in mon.sparsity().items():
        assert abs(s - mon.targets()[n]) < 0.02, n  # half precision shifts a few ties
    path = A.save_thresholds(model, str(tmp_path / "t.safetensors"))
    cpu = make_tiny_llama()
    A.load_thresholds(cpu, path)
    for n, m in A.sparse_layers(cpu).items():
        assert m.act_threshold.item() == A.sparse_layers(model)[n].act_threshold.item()
