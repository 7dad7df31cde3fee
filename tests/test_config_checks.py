"""A broken config.json gives one ConfigError naming its field (types, ranges, shapes that must
agree, missing or mistyped sections, a top level that is not an object); `info` prints it in one line."""
import copy
import json

import pytest

from jblip.cli import main
from jblip.config import ConfigError, from_hf_config

GOOD = dict(
    model_type="instructblip", num_query_tokens=4,
    vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                       patch_size=4, image_size=28, layer_norm_eps=1e-6),
    qformer_config=dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                        encoder_hidden_size=48, vocab_size=99),
    text_config=dict(model_type="llama", vocab_size=131, hidden_size=56, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def broken(path, value):
    cfg = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return cfg


def test_the_good_config_reads():
    config = from_hf_config(GOOD)
    assert config.text.num_kv_heads == 2 and config.num_query_tokens == 4


@pytest.mark.parametrize("path, value, message", [
    ("vision_config.num_hidden_layers", -2, "vision_config.num_hidden_layers must be a positive integer, got -2"),
    ("vision_config.hidden_size", "abc", "vision_config.hidden_size must be an integer, got 'abc'"),
    ("vision_config.hidden_size", 50, "vision_config.hidden_size 50 is not divisible by "
                                      "vision_config.num_attention_heads 4"),
    ("vision_config.layer_norm_eps", -1.0, "vision_config.layer_norm_eps must be a positive finite number"),
    ("vision_config.patch_size", 40, "vision_config.patch_size 40 is larger than vision_config.image_size 28"),
    ("vision_config", KeyError, "the config has no vision_config"),
    ("vision_config", [1, 2], "vision_config must be a JSON object, got [1, 2]"),
    ("qformer_config.num_attention_heads", 0, "qformer_config.num_attention_heads must be a positive integer"),
    ("qformer_config.hidden_size", 42, "qformer_config.hidden_size 42 is not divisible by"),
    ("text_config.num_key_value_heads", 3, "text_config.num_attention_heads 4 is not divisible by "
                                           "text_config.num_key_value_heads 3"),
    ("text_config.vocab_size", 1.5, "text_config.vocab_size must be an integer, got 1.5"),
    ("text_config.tie_word_embeddings", "no", "text_config.tie_word_embeddings must be true or false"),
    ("num_query_tokens", 0, "num_query_tokens must be a positive integer, got 0"),
    ("image_token_index", "x", "image_token_index must be an integer, got 'x'"),
])
def test_a_broken_field_is_one_error_naming_it(path, value, message):
    with pytest.raises(ConfigError) as e:
        from_hf_config(broken(path, value))
    assert message in str(e.value)


@pytest.mark.parametrize("text", ["null", "[1, 2]", '"config"'])
def test_a_top_level_that_is_not_an_object_is_one_error(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        from_hf_config(tmp_path)


def test_info_reports_a_broken_config_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(broken("vision_config.num_hidden_layers", -2)))
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jblip info: error: vision_config.num_hidden_layers must be a positive integer, got -2"
