"""A checkpoint that does not fit the model is refused with one error naming every problem."""

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jblip
from jblip.convert.rules import ConversionError
from jblip.config import ConfigError
from tests.hf_models import tiny_instructblip


def test_missing_extra_and_misshaped_tensors_reported_together(tmp_path):
    tiny_instructblip(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["language_model.model.norm.weight"]
    tensors["language_model.model.layers.0.mlp.extra_proj.weight"] = np.zeros((3, 3), np.float32)
    tensors["language_projection.bias"] = np.zeros((7,), np.float32)
    save_file(tensors, str(weights))
    with pytest.raises(ConversionError) as err:
        jblip.load_pretrained(str(tmp_path))
    message = str(err.value)
    print(message)
    assert "missing from the checkpoint" in message and "llm/norm/scale" in message
    assert "unexpected in the checkpoint" in message and "extra_proj" in message
    assert "shape mismatch" in message and "language_projection.bias: checkpoint (7,)" in message


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        jblip.load_pretrained(str(tmp_path))


def test_unknown_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ConfigError, match="unknown model family 'llava'"):
        jblip.load_pretrained(str(tmp_path))


def test_unknown_config_field_is_refused():
    with pytest.raises(ConfigError, match="unknown config field.*'hiden_size'"):
        jblip.ModelConfig.from_dict({"vision": {"hiden_size": 3}})


def test_non_finite_weights_are_warned_about(tmp_path):
    from jblip.convert.load import NonFiniteWeightsWarning
    tiny_instructblip(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["language_projection.bias"][3] = np.nan
    tensors["language_model.model.norm.weight"][0] = np.inf
    save_file(tensors, str(weights))
    with pytest.warns(NonFiniteWeightsWarning, match=r"2 weight tensor\(s\) hold NaN or infinite values") as w:
        jblip.load_pretrained(str(tmp_path))
    assert "projection" in str(w[0].message) and "llm/norm/scale" in str(w[0].message)
