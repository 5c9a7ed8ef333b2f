"""LoRA's A is drawn as the official code draws it: microsoft/LoRA (``loralib/layers.py``,
``Linear.reset_parameters``) and PEFT (``LoraLayer.reset_lora_parameters``, and its conv
``lora_A``) call ``nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))``, i.e. uniform on
``[-bound, bound]`` with ``bound = gain * sqrt(3 / fan_in)``, ``gain = sqrt(2 / (1 + a^2))``, so
``bound = 1 / sqrt(fan_in)`` (fan_in = in, or c_in * kh * kw for a conv). flax's nnx.LoRA default,
he-uniform, is sqrt(6) times wider and fails these checks."""

import math

import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.finetune import LoRAConv, LoRALinear


def kaiming_uniform_bound(fan_in, a=math.sqrt(5)):
    gain = math.sqrt(2.0 / (1.0 + a * a))  # torch.nn.init.calculate_gain("leaky_relu", a)
    return gain * math.sqrt(3.0 / fan_in)


def check_uniform(a, bound):
    a = np.asarray(a, np.float64).ravel()
    assert np.all(np.abs(a) <= bound * (1 + 1e-6))
    assert np.abs(a).max() > 0.95 * bound  # fills the interval (4096 draws)
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3.0), rtol=0.06)  # uniform's std


def test_linear_a_is_pytorch_kaiming_uniform_sqrt5():
    layer = LoRALinear(64, 80, lora_rank=64, rngs=nnx.Rngs(0))
    check_uniform(layer.lora.lora_a[...], kaiming_uniform_bound(64))
    np.testing.assert_array_equal(np.asarray(layer.lora.lora_b[...]), 0.0)


def test_conv_a_is_pytorch_kaiming_uniform_sqrt5_on_the_patch_fan_in():
    layer = LoRAConv(8, 72, (3, 3), lora_rank=64, rngs=nnx.Rngs(0))
    check_uniform(layer.lora.lora_a[...], kaiming_uniform_bound(3 * 3 * 8))
    np.testing.assert_array_equal(np.asarray(layer.lora.lora_b[...]), 0.0)


def test_same_spread_as_torch_lora_a():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)  # PEFT's lora_A: Linear(in, r), weight (r, in)
    torch.nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
    ref = lin.weight.detach().double().numpy()
    ours = np.asarray(LoRALinear(64, 70, lora_rank=48, rngs=nnx.Rngs(1)).lora.lora_a[...], np.float64)
    np.testing.assert_allclose(np.abs(ours).max(), np.abs(ref).max(), rtol=0.05)
    np.testing.assert_allclose(ours.std(), ref.std(), rtol=0.08)


def test_flax_default_stays_available():
    layer = LoRALinear(64, 80, lora_rank=64, a_initializer=nnx.initializers.he_uniform(), rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(layer.lora.lora_a[...])).max() > 1.5 * kaiming_uniform_bound(64)


def test_snella_linear_kernel_a_is_the_official_lora_init():
    from jaxopt_lab.finetune import SNELLALinear

    layer = SNELLALinear(64, 80, rank=64, kernel="linear", rngs=nnx.Rngs(0))  # SNELL TuningModule "lora"
    check_uniform(layer.lora.lora_a[...], kaiming_uniform_bound(64))
    np.testing.assert_array_equal(np.asarray(layer.lora.lora_b[...]), 0.0)


def test_snella_distance_factors_are_the_official_3d_kaiming_init():
    from jaxopt_lab.finetune import SNELLALinear

    # SNELL KLoRA: kaiming_uniform_(In_Qs (heads, in, q/2), a=sqrt(5)): torch's fan_in of a 3-d tensor is in * q/2
    layer = SNELLALinear(64, 96, rank=64, heads=2, kernel="distance", rngs=nnx.Rngs(0))
    check_uniform(layer.lora.lora_a[...], kaiming_uniform_bound(64 * 32))
    check_uniform(layer.lora.lora_b[...], kaiming_uniform_bound(96 * 32))
