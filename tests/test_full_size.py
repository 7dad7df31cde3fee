"""Released checkpoints at full size, without memory: jax.eval_shape against the checkpoints' key lists.

The reference key lists come from transformers itself: the HF model is built from the
preset's HF config on torch's `meta` device (shapes only, no memory), and its state-dict
keys and shapes are what the released checkpoints hold (checked once against the hub
files' key lists: identical for the four model types).
"""
import pytest
import torch
import transformers

from jblip.convert import stacking
from jblip.convert.hf import hf_rules
from jblip.convert.hf_config import hf_config_dict
from jblip.convert.rules import flatten, plan
from jblip.config import preset
from jblip.model import abstract_params, count_params

# Unique parameters in the HF layout (Flan-T5 checkpoints carry an untied lm_head).
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

MODEL_CLASSES = {"instructblip": "InstructBlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration"}
CONFIG_CLASSES = {"instructblip": "InstructBlipConfig", "blip-2": "Blip2Config"}


@pytest.mark.parametrize("name", list(TOTALS))
def test_parameter_total(name):
    assert count_params(abstract_params(preset(name))) == TOTALS[name]


def hf_key_shapes(name: str) -> dict[str, tuple]:
    """State-dict key -> shape of the HF model for a preset, built on the meta device."""
    config = hf_config_dict(preset(name))
    hf_config = getattr(transformers, CONFIG_CLASSES[config["model_type"]]).from_dict(config)
    with torch.device("meta"):
        model = getattr(transformers, MODEL_CLASSES[config["model_type"]])(hf_config)
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


@pytest.mark.parametrize("name", ["instructblip-vicuna-7b", "instructblip-vicuna-13b", "instructblip-flan-t5-xl",
                                  "blip2-opt-2.7b", "blip2-opt-6.7b-hub", "blip2-flan-t5-xl"])
def test_every_hf_key_maps_to_a_param_of_the_right_shape(name):
    config = preset(name)
    targets = flatten(abstract_params(config))
    # raises one ConversionError naming every missing / unexpected / mis-shaped tensor
    assignment = plan(hf_key_shapes(name), hf_rules(config), targets)
    assert set(assignment) == set(stacking.per_layer_specs(targets))  # every param, every layer
