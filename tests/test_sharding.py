"""Sharded models on 8 emulated CPU devices: same logits, greedy and beam tokens as on one device,
and the params really are split (shard shapes checked, not only the results)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jblip
from jblip import sharding
from jblip.config import PRESETS
from jblip.model import abstract_params
from jblip.pretrained import VisionLanguageModel
from tests.hf_models import (IMAGE_TOKEN, NUM_QUERIES, TINY_LLAMA, TINY_OPT, TINY_T5, left_padded_prompts,
                             max_diff, right_padded_text, tiny_blip2, tiny_instructblip)

TOL = 1e-5
MESHES = ["data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"]
# Widths chosen so that some dims divide the mesh axes and some do not: vocab 131 is padded
# (to 136 on tensor=8, 132 on tensor=2); 6 heads and MLP 100 do not split 8 ways (replicated
# there), the LLaMA width 72 does.
# One layer per stack: sharding is the same per layer, and compiling for 8 devices is the cost.
ONE_LAYER = dict(vision=dict(num_hidden_layers=1), qformer=dict(num_hidden_layers=1))
VICUNA = {**TINY_LLAMA, "hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 6,
          "intermediate_size": 100, "num_hidden_layers": 1}
FAMILIES = {
    "vicuna": lambda p: tiny_instructblip(p, seed=11, text=VICUNA, **ONE_LAYER),
    "opt": lambda p: tiny_blip2(p, seed=12, text={**TINY_OPT, "num_hidden_layers": 1}, **ONE_LAYER),
    "t5": lambda p: tiny_blip2(p, seed=13, text={**TINY_T5, "num_layers": 1, "num_decoder_layers": 1}, **ONE_LAYER),
}
GENERATE_ON = "data=2,fsdp=2,tensor=2"  # greedy and beam tokens on the mesh that uses all three axes
BEAM = dict(strategy="beam", num_beams=3, max_new_tokens=4)
BATCH = 4


def make_inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    inputs = dict(pixel_values=rng.standard_normal((BATCH, 28, 28, 3)).astype(np.float32))
    if config.qformer.use_text_input:
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = right_padded_text([3, 7, 1, 2], 99, seed)
    if config.family == "t5":
        ids = np.concatenate([np.full((BATCH, NUM_QUERIES), IMAGE_TOKEN), rng.integers(3, 120, (BATCH, 5))], 1)
        mask = np.ones_like(ids)
        mask[1, -2:] = 0
        inputs.update(decoder_input_ids=np.array([[0, 5, 9], [0, 7, 1], [0, 3, 4], [0, 8, 8]]))
    else:
        ids, mask = left_padded_prompts([4, 1, 6, 3], 120, pad_id=0, bos_id=2, seed=seed, image_token=IMAGE_TOKEN)
    return dict(inputs, input_ids=ids, attention_mask=mask)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A saved tiny HF model, its single-device jblip run (logits, greedy tokens) and inputs."""
    path = str(tmp_path_factory.mktemp(request.param))
    FAMILIES[request.param](path)
    single = jblip.load_pretrained(path)
    inputs = make_inputs(single.config)
    logits = np.asarray(single.forward(**inputs))
    tokens = single.generate(**_generate_args(inputs), max_new_tokens=4).tokens
    beams = single.generate(**_generate_args(inputs), **BEAM).tokens
    return dict(name=request.param, path=path, single=single, inputs=inputs, logits=logits,
                tokens=np.asarray(tokens), beams=np.asarray(beams))


def _generate_args(inputs):
    return {k: v for k, v in inputs.items() if k != "decoder_input_ids"}


def _shard_shape(array):
    shapes = {tuple(s.data.shape) for s in array.addressable_shards}
    assert len(shapes) == 1, shapes  # even split
    return shapes.pop()


# The per-device shard shapes we expect (a hand-written table, not recomputed from the rules).
EXPECTED_SHARDS = {
    # vicuna q_proj kernel (72, 6, 12) and embedding (rows, 72)
    ("vicuna", "data=8"): {"q": (72, 6, 12), "embed": (131, 72)},
    ("vicuna", "fsdp=8"): {"q": (9, 6, 12), "embed": (131, 9)},
    ("vicuna", "tensor=8"): {"q": (72, 6, 12), "embed": (17, 72)},          # 6 heads: replicated; 136 rows
    ("vicuna", "data=2,fsdp=2,tensor=2"): {"q": (36, 3, 12), "embed": (66, 36)},
    ("vicuna", "fsdp=4,tensor=2"): {"q": (18, 3, 12), "embed": (66, 18)},
    # opt q_proj kernel (40, 4, 10), embedding (rows, 40)
    ("opt", "data=8"): {"q": (40, 4, 10), "embed": (131, 40)},
    ("opt", "fsdp=8"): {"q": (5, 4, 10), "embed": (131, 5)},
    ("opt", "tensor=8"): {"q": (40, 4, 10), "embed": (17, 40)},
    ("opt", "data=2,fsdp=2,tensor=2"): {"q": (20, 2, 10), "embed": (66, 20)},
    ("opt", "fsdp=4,tensor=2"): {"q": (10, 2, 10), "embed": (66, 10)},
    # t5 encoder q kernel (40, 3, 12): 3 heads never split; shared embedding (rows, 40)
    ("t5", "data=8"): {"q": (40, 3, 12), "embed": (131, 40)},
    ("t5", "fsdp=8"): {"q": (5, 3, 12), "embed": (131, 5)},
    ("t5", "tensor=8"): {"q": (40, 3, 12), "embed": (17, 40)},
    ("t5", "data=2,fsdp=2,tensor=2"): {"q": (20, 3, 12), "embed": (66, 20)},
    ("t5", "fsdp=4,tensor=2"): {"q": (10, 3, 12), "embed": (66, 10)},
}


def _key_params(name, params):
    """A stacked q kernel [L, ...] (the layer scan's params) and the token embedding."""
    llm = params["llm"]
    if name == "vicuna":
        return llm["layers"]["self_attn"]["q_proj"]["kernel"], llm["embed_tokens"]["embedding"]
    if name == "opt":
        return llm["layers"]["self_attn"]["q_proj"]["kernel"], llm["embed_tokens"]["embedding"]
    return llm["encoder"]["layers"]["self_attn"]["q"]["kernel"], llm["shared"]["embedding"]


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_model_matches_single_device(family, spec):
    mesh = sharding.make_mesh(spec)
    model = jblip.load_pretrained(family["path"], mesh=mesh)
    logits = model.forward(**family["inputs"])
    delta = max_diff(logits, family["logits"])
    print(f"{family['name']} {spec}: max |delta| logits {delta:.2e}")
    assert logits.shape == family["logits"].shape  # padded vocab rows sliced off
    assert delta <= TOL

    # params are split as the table says, and live on all 8 devices
    q, embed = _key_params(family["name"], model.params)
    want = EXPECTED_SHARDS[family["name"], spec]
    assert _shard_shape(q)[0] == q.shape[0]  # the stacked layers axis is never split
    assert (_shard_shape(q)[1:], _shard_shape(embed)) == (want["q"], want["embed"])
    assert q.sharding.mesh == mesh and len(q.sharding.device_set) == 8
    if spec == "fsdp=8":  # nearly every weight is split 8 ways (norm scales, biases of odd widths are not)
        held = sum(int(np.prod(_shard_shape(x))) for x in jax.tree_util.tree_leaves(model.params))
        total = sum(x.size for x in jax.tree_util.tree_leaves(model.params))
        assert held < total / 4, (held, total)

    # batch 4 splits over data x fsdp where it divides (data=8: replicated)
    expected_batch = {"data=8": P(), "fsdp=8": P(), "tensor=8": P(),
                      "data=2,fsdp=2,tensor=2": P(("data", "fsdp")), "fsdp=4,tensor=2": P("fsdp")}[spec]
    assert logits.sharding.spec == expected_batch or (expected_batch == P() and logits.sharding.is_fully_replicated)

    if spec == GENERATE_ON:
        tokens = model.generate(**_generate_args(family["inputs"]), max_new_tokens=4).tokens
        np.testing.assert_array_equal(np.asarray(tokens), family["tokens"])
        beams = model.generate(**_generate_args(family["inputs"]), **BEAM).tokens
        np.testing.assert_array_equal(np.asarray(beams), family["beams"])


def test_placing_host_params_on_a_mesh(family):
    """VisionLanguageModel(config, host params, mesh=...) pads and shards them itself."""
    if family["name"] != "vicuna":
        pytest.skip("same code path for every family; one compile is enough")
    single = family["single"]
    model = VisionLanguageModel(single.config, single.params, mesh=sharding.make_mesh("tensor=8"))
    assert model.config.text.padded_vocab_size == 136 and single.config.text.padded_vocab_size is None
    assert max_diff(model.forward(**family["inputs"]), family["logits"]) <= TOL


# ----------------------------------------------------------------------------- units, no model runs

def test_mesh_spec():
    mesh = sharding.make_mesh("data=2,fsdp=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    for bad, message in [("data=3", "needs 3 devices"), ("fsdp=-1,tensor=3", "do not divide"),
                         ("pipeline=2", "is not <axis>=<size>"), ("data=-1,fsdp=-1", "only one axis"),
                         ("data=2,data=4", "given twice"), ("tensor=x", "not an integer")]:
        with pytest.raises(ValueError, match=message):
            sharding.make_mesh(bad)


def test_spec_rules():
    mesh = {"data": 2, "fsdp": 4, "tensor": 2}
    spec = sharding.spec_for
    assert spec((4096, 32, 128), ("embed", "heads", "kv"), mesh) == P("fsdp", "tensor", None)
    assert spec((32001, 4096), ("vocab", "embed"), mesh) == P(None, "fsdp")  # odd vocab: replicated unless padded
    assert spec((32002, 4096), ("vocab", "embed"), mesh) == P("tensor", "fsdp")
    assert spec((2560, 2560), ("embed", "embed"), mesh) == P("fsdp", None)  # a mesh axis is used once
    assert spec((6, 5), ("batch", "length"), mesh) == P("data", None)        # 6 splits 2 ways, not 8
    assert spec((8, 5), ("batch", "length"), mesh) == P(("data", "fsdp"), None)
    assert spec((40, 40), ("qf_embed", "qf_mlp"), mesh) == P("fsdp", None)   # Q-Former: FSDP only
    with pytest.raises(ValueError, match="no sharding rule"):
        spec((4,), ("mystery",), mesh)
    rules = sharding.override_rules(qf_embed=None)
    assert spec((40, 40), ("qf_embed", "qf_mlp"), mesh, rules) == P(None, None)
    with pytest.raises(ValueError, match="unknown logical axis"):
        sharding.override_rules(qformer=None)
    assert sharding.spec_for((3, 2, 32, 7, 128), sharding.CACHE_AXES, mesh) == P(None, "data", "tensor", None, None)


@pytest.mark.parametrize("name", ["instructblip-vicuna-13b", "blip2-opt-2.7b", "instructblip-flan-t5-xl"])
def test_released_models_split_evenly_over_fsdp(name):
    """Every param name of every family has a rule, and on fsdp=8 a device holds 1/8 of the
    weights (to within unsplit biases and norm scales), the numbers behind the README's memory table."""
    boxed = abstract_params(PRESETS[name].with_precision("bfloat16"), boxed=True)
    total = sum(x.value.size * x.value.dtype.itemsize for x in jax.tree_util.tree_leaves(
        boxed, is_leaf=lambda x: hasattr(x, "names")))
    per_device = sharding.per_device_bytes(boxed, {"fsdp": 8})
    print(f"{name}: {total / 2**30:.2f} GiB bf16, {per_device / 2**30:.2f} GiB per device on fsdp=8")
    assert total / 8 <= per_device <= total / 8 * 1.01


def test_place_pads_and_splits():
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    host = np.arange(15, dtype=np.float32).reshape(5, 3)
    target = NamedSharding(mesh, P("tensor", None))
    placed = sharding.place(host, target, (8, 3))
    assert placed.shape == (8, 3) and _shard_shape(placed) == (2, 3)
    np.testing.assert_array_equal(np.asarray(placed), np.pad(host, ((0, 3), (0, 0))))
    with pytest.raises(ValueError, match="cannot place"):
        sharding.place(host, target, (4, 3))


def test_pad_vocab():
    config = PRESETS["instructblip-vicuna-7b"]
    assert sharding.pad_vocab(config, {"fsdp": 8}).text.padded_vocab_size is None
    padded = sharding.pad_vocab(config, {"fsdp": 4, "tensor": 8})
    assert padded.text.padded_vocab_size == 32008 and padded.text.vocab_rows == 32008
    assert sharding.pad_vocab(padded, {"fsdp": 4, "tensor": 8}) is padded
    opt = sharding.pad_vocab(PRESETS["blip2-opt-2.7b"], {"tensor": 2})
    assert opt.text.padded_vocab_size is None  # 50272 is even


def test_kv_cache_is_pinned_to_its_sharding():
    """Stacked cache leaves [L, B, N, S, H] come out split batch over data x fsdp and heads over
    tensor (layers never), as the decode loop keeps them (kv_cache pins every write and every
    layer's read; without rules it is a no-op)."""
    from jblip import kv_cache
    mesh = sharding.make_mesh(GENERATE_ON)

    def step(k):
        cache = kv_cache.init(2, batch=4, heads=6, max_len=8, head_dim=3)
        return kv_cache.write_layer(cache, 1, k, k, 2)["k"]

    def read(k):
        cache = kv_cache.write_layer(kv_cache.init(2, batch=4, heads=6, max_len=8, head_dim=3), 1, k, k, 2)
        return kv_cache.read_layer(cache, 1)[0]

    k = jnp.ones((4, 1, 6, 3))
    with sharding.activation_rules(mesh):
        out = jax.jit(step)(k)
        layer = jax.jit(read)(k)
    assert out.sharding.spec == P(None, ("data", "fsdp"), "tensor")
    assert layer.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(np.asarray(out)[1, :, :, 2], 1.0)  # layer 1, slot 2 written
    assert float(np.abs(np.asarray(out)[0]).max()) == 0.0           # layer 0 untouched
    assert jax.jit(step)(k).sharding.is_fully_replicated  # no rules: left to XLA (one device here)
