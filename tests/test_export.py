"""Full-size programs exported for TPU and GPU from this CPU host, with abstract params (no memory):
`forward`, greedy and beam `generate` and the train step of InstructBLIP-Vicuna-13B,
InstructBLIP-Flan-T5-XXL and BLIP-2-OPT-6.7B, on one device and on an 8-device mesh. Each
export succeeds, and its StableHLO holds exactly the while loops the program's structure
calls for: no loop that only a CPU program wants (the blocked CPU attention)."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding

from jblip import sharding
from jblip.config import preset
from jblip.generate import generate
from jblip.model import BlipModel, abstract_params
from jblip.sampling import SamplerConfig, split
from jblip.train import trainable as tr
from jblip.train.optim import OptimConfig
from jblip.train.build import training_precision
from jblip.train.state import TOWER_DTYPE, Placement, init_state
from jblip.train.step import make_train_step

PRESETS = ("instructblip-vicuna-13b", "instructblip-flan-t5-xxl", "blip2-opt-6.7b")
PROGRAMS = ("forward", "greedy", "beam", "train")
MESH = "data=2,fsdp=2,tensor=2"
PLATFORMS = ("tpu", "cuda")
BATCH, PROMPT, NEW, BEAMS = 4, 48, 8, 3


def stacks(params) -> list[str]:
    """Paths of the scanned layer stacks (`jblip.scan`: a module named `layers`)."""
    found = []

    def walk(tree, path):
        for key, sub in tree.items():
            if key == "layers":
                found.append(f"{path}/{key}")
            elif isinstance(sub, dict):
                walk(sub, f"{path}/{key}")
    walk(params, "")
    return found


def expected_while_loops(params, program: str) -> int:
    """While loops in the exported program: the decode loop, plus one per pass over each scanned
    stack (`nn.scan` lowers to a while loop).
      forward   every stack once.
      generate  one decode loop; the image towers and an encoder once (outside it); every
                decoder stack twice (the prefill or first step, and the step in the loop body).
      train     (Q-Former set) every stack once forward; the stacks the gradient flows back
                through (Q-Former and LM, not the frozen ViT before them) once more backward.
    """
    paths = stacks(params)
    if program == "forward":
        return len(paths)
    if program in ("greedy", "beam"):
        decoders = [p for p in paths if p.startswith("/llm") and "encoder" not in p]
        return 1 + len(paths) + len(decoders)
    return len(paths) + len([p for p in paths if not p.startswith("/vision")])


def while_loops(mlir: str) -> int:
    return len(re.findall(r"\bstablehlo\.while\b", mlir))


def abstract(tree, shardings=None):
    if shardings is None:
        return tree
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def inputs(config, mesh, decoder_len: int):
    """Abstract batch: pixels, a prompt (ids + mask), Q-Former instruction, T5 decoder ids."""
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    s = config.vision.image_size
    batch = dict(pixel_values=jax.ShapeDtypeStruct((BATCH, s, s, config.vision.num_channels), jnp.float32),
                 input_ids=i32(BATCH, PROMPT), attention_mask=i32(BATCH, PROMPT))
    if config.qformer.use_text_input:
        batch.update(qformer_ids=i32(BATCH, 16), qformer_mask=i32(BATCH, 16))
    if config.family == "t5":
        batch.update(decoder_input_ids=i32(BATCH, decoder_len))
    if mesh is not None:
        spec = NamedSharding(mesh, sharding.batch_spec(BATCH, mesh))
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec) for k, v in batch.items()}
    return batch


def export(name: str, program: str, mesh):
    # bf16 towers; training keeps float32 masters of the trainable params (`train.build`)
    config = preset(name).with_precision(training_precision("bfloat16") if program == "train" else "bfloat16")
    if mesh is not None:
        config = sharding.pad_vocab(config, mesh)
    boxed = abstract_params(config, boxed=True)
    params = abstract(nn.unbox(boxed), None if mesh is None else sharding.param_shardings(boxed, mesh))
    module, prepend = BlipModel(config), config.image_token_index is None
    if program == "train":
        return export_train_step(config, params, mesh, prepend), params
    batch = inputs(config, mesh, decoder_len=8)
    if program == "forward":
        fn = lambda p, b: module.apply({"params": p}, **b, prepend_queries=prepend)
    else:
        batch.pop("decoder_input_ids", None)
        cfg = SamplerConfig(max_new_tokens=NEW, eos_token_ids=(2,)) if program == "greedy" else \
            SamplerConfig(strategy="beam", num_beams=BEAMS, max_new_tokens=NEW, eos_token_ids=(2,))
        static, rows = split(cfg, BATCH)
        batch["rows"] = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rows)
        fn = lambda p, b: generate(module, p, static, b["rows"], b["pixel_values"], b["input_ids"],
                                   b["attention_mask"], b.get("qformer_ids"), b.get("qformer_mask"),
                                   prepend_queries=prepend)
    with sharding.activation_rules(mesh):
        return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(params, batch).mlir_module(), params


def export_train_step(config, params, mesh, prepend: bool):
    """The Q-Former instruction-tuning step (`train.step.make_train_step`) on abstract state."""
    optim = OptimConfig(warmup_steps=0, total_steps=100)
    tx = optax.adamw(1e-5)
    trainable, frozen = tr.split(params, "qformer")
    frozen = {tower: jax.tree_util.tree_map(  # frozen towers are stored in their compute dtype
        lambda x: jax.ShapeDtypeStruct(x.shape, TOWER_DTYPE[tower](config.precision), sharding=x.sharding), sub)
        for tower, sub in frozen.items()}
    placement = Placement(config, "qformer", tx, mesh)
    state = (placement.abstract_state(trainable) if mesh is not None
             else jax.eval_shape(lambda p: init_state(p, tx), trainable))
    batch = inputs(config, mesh, decoder_len=PROMPT)
    labels = batch["decoder_input_ids"] if config.family == "t5" else batch["input_ids"]
    batch["labels"] = labels
    step = make_train_step(config, tx, optim, placement, batch_size=BATCH, prepend_queries=prepend)
    jitted = getattr(step, "jitted", step)
    with sharding.activation_rules(mesh, placement.rules):
        return jax.export.export(jitted, platforms=PLATFORMS)(state, frozen, batch).mlir_module()


CASES = [(n, p, layout) for n in PRESETS for p in PROGRAMS for layout in ("one", "mesh")]


@pytest.mark.parametrize("name,program,layout", CASES)
def test_exports_for_tpu_and_gpu_with_only_the_loops_it_needs(name, program, layout):
    mesh = sharding.make_mesh(MESH) if layout == "mesh" else None
    mlir, params = export(name, program, mesh)
    assert while_loops(mlir) == expected_while_loops(params, program)
    assert "@cpu" not in mlir and "host_callback" not in mlir  # nothing that calls back to this host
