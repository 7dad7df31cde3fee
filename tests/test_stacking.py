"""Stacked (scanned) params are converted from and exported to per-layer checkpoint keys."""
from __future__ import annotations

import numpy as np
import pytest

from jblip.convert import stacking
from jblip.convert.rules import IDENTITY, LINEAR, ConversionError, DictSource, Rule, convert_params, flatten, plan


def shapes(tree):
    return {p: tuple(x.shape) for p, x in flatten(tree).items()}


def test_plain_and_grouped_stacks_map_to_per_layer_paths():
    stacked = {"llm/layers/mlp/kernel": (3, 4, 5), "llm/norm/scale": (4,),
               "qf/layers/layer_0/attn/kernel": (2, 6), "qf/layers/layer_1/ffn/kernel": (2, 7),
               "qf/layers_4/ffn/kernel": (7,)}
    slots = stacking.per_layer_slots(stacked)
    assert slots["llm/layers_2/mlp/kernel"] == ("llm/layers/mlp/kernel", 2)
    assert slots["llm/norm/scale"] is None
    # groups of two: layer 2g + j
    assert slots["qf/layers_0/attn/kernel"] == ("qf/layers/layer_0/attn/kernel", 0)
    assert slots["qf/layers_2/attn/kernel"] == ("qf/layers/layer_0/attn/kernel", 1)
    assert slots["qf/layers_3/ffn/kernel"] == ("qf/layers/layer_1/ffn/kernel", 1)
    assert slots["qf/layers_4/ffn/kernel"] is None  # kept outside the stack
    assert len(slots) == 3 + 1 + 2 + 2 + 1


def test_a_stack_may_not_mix_grouped_and_plain_members():
    with pytest.raises(ValueError, match="all grouped"):
        stacking.per_layer_slots({"a/layers/layer_0/k": (2, 3), "a/layers/norm/scale": (2, 3)})


RULES = [Rule(r"h\.(\d+)\.fc\.weight", r"llm/layers_\1/fc/kernel", LINEAR),
         Rule(r"h\.(\d+)\.ln\.weight", r"llm/layers_\1/ln/scale", IDENTITY),
         Rule(r"ln_f\.weight", "llm/norm/scale", IDENTITY)]


class Spec:
    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = shape, np.dtype(dtype)


def abstract(layers=3):
    return {"llm": {"layers": {"fc": {"kernel": Spec((layers, 4, 5))}, "ln": {"scale": Spec((layers, 4))}},
                    "norm": {"scale": Spec((4,))}}}


def checkpoint(layers=3, seed=0):
    r = np.random.default_rng(seed)
    out = {f"h.{i}.fc.weight": r.standard_normal((5, 4)).astype(np.float32) for i in range(layers)}
    out.update({f"h.{i}.ln.weight": r.standard_normal(4).astype(np.float32) for i in range(layers)})
    out["ln_f.weight"] = r.standard_normal(4).astype(np.float32)
    return out


def test_convert_params_fills_each_stacked_param_from_per_layer_tensors_and_places_it_once():
    ckpt = checkpoint()
    placed = []
    params = convert_params(DictSource(ckpt), RULES, abstract(), place=lambda p, x: placed.append(p) or x)
    kernel = params["llm"]["layers"]["fc"]["kernel"]
    assert kernel.shape == (3, 4, 5)
    for i in range(3):
        np.testing.assert_array_equal(kernel[i], ckpt[f"h.{i}.fc.weight"].T)
        np.testing.assert_array_equal(params["llm"]["layers"]["ln"]["scale"][i], ckpt[f"h.{i}.ln.weight"])
    assert sorted(placed) == ["llm/layers/fc/kernel", "llm/layers/ln/scale", "llm/norm/scale"]

    view = stacking.PerLayerView(flatten(params))
    assert view.meta("llm/layers_1/fc/kernel") == ((4, 5), np.dtype(np.float32))
    np.testing.assert_array_equal(view["llm/layers_1/fc/kernel"], ckpt["h.1.fc.weight"].T)


def test_a_missing_layer_is_reported_by_its_per_layer_name():
    ckpt = checkpoint()
    del ckpt["h.1.fc.weight"]
    with pytest.raises(ConversionError, match=r"llm/layers_1/fc/kernel \(4, 5\)"):
        plan({k: v.shape for k, v in ckpt.items()}, RULES, flatten(abstract()))


def test_a_mis_shaped_tensor_names_the_shape_the_checkpoint_should_have():
    ckpt = checkpoint()
    ckpt["h.0.fc.weight"] = ckpt["h.0.fc.weight"].T  # the kernel's own layout, not torch's (out, in)
    with pytest.raises(ConversionError, match=r"h\.0\.fc\.weight: checkpoint \(4, 5\), but "
                                              r"llm/layers_0/fc/kernel \(4, 5\) needs \(5, 4\)"):
        plan({k: v.shape for k, v in ckpt.items()}, RULES, flatten(abstract()))
