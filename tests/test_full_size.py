"""Released checkpoints at full size, without memory: jax.eval_shape against the HF key lists."""
import os

import pytest

from convert.hf import hf_rules
from convert.rules import flatten, plan
from jblip.config import preset
from jblip.model import abstract_params, count_params

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "hf_keys")

# ARCHITECTURE.md §1.6 (unique parameters, HF layout, Flan-T5 lm_head untied).
TOTALS = {
    "instructblip-vicuna-7b": 7_913_210_624,
    "instructblip-vicuna-7b-hub": 7_913_726_720,
    "instructblip-vicuna-13b": 14_191_448_832,
    "instructblip-flan-t5-xl": 4_022_969_088,
    "instructblip-flan-t5-xxl": 12_310_119_168,
    "blip2-opt-2.7b": 3_744_679_936,
    "blip2-opt-6.7b": 7_752_738_304,
    "blip2-opt-2.7b-hub": 3_744_761_856,
    "blip2-opt-6.7b-hub": 7_752_869_376,
    "blip2-opt-2.7b-coco": 3_745_271_296,
    "blip2-opt-6.7b-coco": 7_753_329_664,
    "blip2-flan-t5-xl": 3_942_446_592,
    "blip2-flan-t5-xl-coco": 3_943_037_952,
    "blip2-flan-t5-xxl": 12_229_596_672,
}

KEY_LISTS = {
    "instructblip-vicuna-7b": "instructblip-vicuna-7b.txt",
    "instructblip-flan-t5-xl": "instructblip-flan-t5-xl.txt",
    "blip2-opt-2.7b": "blip2-opt-2.7b.txt",
    "blip2-flan-t5-xl": "blip2-flan-t5-xl.txt",
}


@pytest.mark.parametrize("name", list(TOTALS))
def test_parameter_total(name):
    assert count_params(abstract_params(preset(name))) == TOTALS[name]


def read_keys(filename):
    shapes = {}
    with open(os.path.join(REFERENCE, filename)) as f:
        for line in f:
            key, shape, _ = line.rstrip("\n").split("\t")
            shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


@pytest.mark.parametrize("name", list(KEY_LISTS))
def test_every_hf_key_maps_to_a_param_of_the_right_shape(name):
    path = os.path.join(REFERENCE, KEY_LISTS[name])
    if not os.path.exists(path):
        pytest.skip(f"reference key list not found at {path}")
    config = preset(name)
    targets = flatten(abstract_params(config))
    # raises one ConversionError naming every missing / unexpected / mis-shaped tensor
    assignment = plan(read_keys(KEY_LISTS[name]), hf_rules(config), targets)
    assert set(assignment) == set(targets)
