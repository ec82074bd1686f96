import math

import pytest
import torch
import torch.nn as nn

from actsparse import SparseLinear, SparsityParams
from actsparse.sparse_linear import sparsify_tensor


def _lin(bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(16, 8, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_reference_on_masked_input(dtype, bias):
    lin = _lin(bias, dtype)
    x = torch.randn(3, 5, 16).to(dtype)
    sl = SparseLinear.from_linear(lin, 0.5)
    ref = torch.where(x.abs() > 0.5, x, torch.zeros_like(x))
    y = sl(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, lin(ref), rtol=0, atol=0)
    assert (ref == 0).float().mean() > 0.2  # the mask did something


def test_threshold_uses_less_or_equal():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.625, 2.0])
    assert sparsify_tensor(x, torch.tensor(0.5)).tolist() == [-1.0, 0.0, 0.0, 0.0, 0.625, 2.0]


def test_minus_inf_threshold_is_exact_identity():
    lin = _lin()
    x = torch.randn(4, 16)
    x[0, 0] = 0.0
    assert torch.equal(SparseLinear.from_linear(lin)(x), lin(x))
    assert math.isinf(SparseLinear.from_linear(lin).act_threshold.item())


def test_shares_parameters_and_threshold_is_a_state_dict_buffer():
    lin = _lin()
    sl = SparseLinear.from_linear(lin, 0.25)
    assert sl.weight is lin.weight and sl.bias is lin.bias
    sd = sl.state_dict()
    assert set(sd) == {"weight", "bias", "act_threshold"} and sd["act_threshold"].item() == 0.25
    assert isinstance(sl, nn.Linear)
    back = sl.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight


def test_keeps_user_hooks():
    lin = _lin()
    seen = []
    lin.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    SparseLinear.from_linear(lin, 0.1)(torch.randn(2, 16))
    assert seen == [torch.Size([2, 8])]


def test_rejects_linear_subclasses():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError, match="IgnoredScope"):
        SparseLinear.from_linear(MyLinear(4, 4))


def test_moves_with_model_dtype_and_keeps_fp32_threshold():
    sl = SparseLinear.from_linear(_lin(), 0.3)
    sl = sl.to(torch.bfloat16)
    assert sl.weight.dtype == torch.bfloat16
    assert sl(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_shifted_layer_reads_its_weight_sums_once_and_again_after_an_edit():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    layer = SparseLinear.from_linear(lin, SparsityParams(0.3, shift=0.5))
    x = torch.randn(3, 16)

    def reference():
        xs = (x - 0.5).masked_fill((x - 0.5).abs() <= 0.3, 0.0)
        return xs @ lin.weight.t() + 0.5 * lin.weight.sum(1) + lin.bias

    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference())
        sums = layer._wsum[1]
        layer(x)
        assert layer._wsum[1] is sums  # not recomputed from the weight
        lin.weight.mul_(2)  # the shared weight edited in place: the sums follow
        torch.testing.assert_close(layer(x), reference())
        assert layer._wsum[1] is not sums
