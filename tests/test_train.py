"""Fine-tuning: HF-equal loss and gradients, frozen params, sharded = single device,
exact resume, checkpoints across meshes, and a tiny model that learns."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jblip
from jblip.convert.fuse import FuseQVBias
from jblip.convert.hf import hf_rules
from jblip.convert.rules import DictSource, convert_params, flatten
from jblip.config import PRESETS, OPTConfig, T5Config
from jblip.model import abstract_params
from tests.hf_models import TINY_T5, tiny_blip2, tiny_instructblip
from jblip.train import trainable as tr
from jblip.train.build import initial_params
from jblip.train.checkpoint import Checkpointer
from jblip.train.config import TrainConfig
from jblip.train.labels import TextLayout, collate, encode_example
from jblip.train.loop import make_mesh, train
from jblip.train.optim import OptimConfig, decays, make_optimizer
from jblip.train.state import Placement, init_state
from jblip.model import BlipModel
from jblip.train.step import forward_loss, loss_and_grads, make_train_step
from jblip.train.synthetic import make_dataset

TINY = PRESETS["tiny-instructblip-vicuna"]
OPTIM = OptimConfig(lr=1e-3, warmup_lr=0.0, warmup_steps=2, total_steps=5, clip_norm=1.0)
FAMILIES = {
    "vicuna": lambda p: tiny_instructblip(p, seed=21),
    "t5": lambda p: tiny_instructblip(p, seed=22, text=TINY_T5),
    "opt": lambda p: tiny_blip2(p, seed=23),
}


def token_batch(layout, rng, batch, image_size=28, vocab=120, qvocab=90):
    """Random instructions/answers of varied lengths through the real label builder, plus pixels."""
    examples = [encode_example(rng.integers(4, vocab, rng.integers(1, 9)).tolist(),
                               rng.integers(4, vocab, rng.integers(1, 5)).tolist(), layout,
                               rng.integers(4, qvocab, rng.integers(1, 9)).tolist())
                for _ in range(batch)]
    out = collate(examples, layout, lengths=dict(input_ids=32, decoder_input_ids=8, qformer_ids=16))  # one shape
    out["pixel_values"] = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    return out


def hf_gradients(model, config):
    """The torch .grad of every HF param, converted to jblip's params layout (zeros where None)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    grads = {k: (named[k].grad.numpy() if k in named and named[k].grad is not None else np.zeros(v.shape, np.float32))
             for k, v in model.state_dict().items()}
    return convert_params(FuseQVBias(DictSource(grads)), hf_rules(config), abstract_params(config))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_and_qformer_grads_match_torch(family, tmp_path):
    hf = FAMILIES[family](tmp_path)
    model = jblip.load_pretrained(str(tmp_path))
    layout = TextLayout.for_model(model.config, qformer_cls=1, qformer_sep=2)  # tiny Q-Former vocab
    assert not layout.prepend_queries  # the HF layout: <image> placeholders in input_ids
    batch = token_batch(layout, np.random.default_rng(5), batch=3)

    t = lambda k: torch.tensor(batch[k]).long()
    kwargs = dict(pixel_values=torch.tensor(batch["pixel_values"]).permute(0, 3, 1, 2), input_ids=t("input_ids"),
                  attention_mask=t("attention_mask"), labels=t("labels"))
    if "qformer_ids" in batch:
        kwargs.update(qformer_input_ids=t("qformer_ids"), qformer_attention_mask=t("qformer_mask"))
    if "decoder_input_ids" in batch:
        kwargs.update(decoder_input_ids=t("decoder_input_ids"))
    hf.zero_grad()
    ref = hf(**kwargs).loss
    ref.backward()

    trainable, frozen = tr.split(model.params, "qformer")
    fn = jax.jit(lambda p, f, b: loss_and_grads(model.module, p, f, b, prepend_queries=False))
    (loss, count), grads = fn(trainable, frozen, {k: jax.numpy.asarray(v) for k, v in batch.items()})
    loss_rel = abs(float(loss) - ref.item()) / ref.item()

    want = flatten(tr.split(hf_gradients(hf, model.config), "qformer")[0])
    got = flatten(jax.device_get(grads))
    assert sorted(want) == sorted(got)
    scale = max(np.abs(g).max() for g in want.values())
    worst_global = max(np.abs(got[k] - want[k]).max() for k in want) / scale
    # per tensor, for tensors whose gradient is not zero by symmetry (e.g. attention key biases)
    per_tensor = {k: np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()
                  for k in want if np.abs(want[k]).max() > 1e-4 * scale}
    worst_key = max(per_tensor, key=per_tensor.get)
    print(f"{family}: loss {float(loss):.6f} vs torch {ref.item():.6f} (rel {loss_rel:.2e}, {int(count)} tokens); "
          f"Q-Former grads max rel {worst_global:.2e} (whole set), {per_tensor[worst_key]:.2e} (worst tensor "
          f"{worst_key}); {len(want)} tensors")
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum() if family != "t5" else (batch["labels"] != -100).sum())
    assert loss_rel <= 1e-5
    assert worst_global <= 1e-4 and per_tensor[worst_key] <= 1e-4


@pytest.mark.parametrize("placeholders", [False, True])
def test_head_on_scored_positions_gives_the_full_logits_loss(placeholders):
    """The train step's head-at-scored-positions path = HF's cut/shift loss over full logits."""
    config = dataclasses.replace(TINY, image_token_index=130) if placeholders else TINY
    layout = TextLayout.for_model(config, qformer_cls=1, qformer_sep=2)
    assert layout.prepend_queries != placeholders
    batch = token_batch(layout, np.random.default_rng(1), batch=4)
    full = {k: v for k, v in batch.items() if not k.startswith("target_")}
    params = initial_params(config, 1)
    loss = jax.jit(lambda p, b: forward_loss(BlipModel(config), p, b, layout.prepend_queries))
    (a, n), (b, m) = loss(params, batch), loss(params, full)
    print(f"scored-positions loss {float(a):.7f}, full-logits loss {float(b):.7f}")
    assert int(n) == int(m) == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(float(a) - float(b)) <= 1e-6 * abs(float(b))


TINY_T5_TEXT = T5Config(vocab_size=131, d_model=40, d_kv=12, d_ff=72, num_layers=2, num_decoder_layers=2,
                        num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20)
TINY_OPT_TEXT = OPTConfig(vocab_size=131, hidden_size=40, ffn_dim=72, num_layers=2, num_heads=4,
                          max_position_embeddings=100, word_embed_proj_dim=40, pad_token_id=1, eos_token_id=50)


def _remat_case(text, policy):
    config = dataclasses.replace(TINY, text=text)
    layout = TextLayout.for_model(config, qformer_cls=1, qformer_sep=2)
    batch = token_batch(layout, np.random.default_rng(2), batch=2)
    trainable, frozen = tr.split(initial_params(config, 2), "qformer+llm")
    fns = [lambda p, f, b, r=r: loss_and_grads(BlipModel(config, remat=r), p, f, b, layout.prepend_queries)
           for r in ("none", policy)]
    return fns, (trainable, frozen, batch)


@pytest.mark.parametrize("text", [TINY.text, TINY_OPT_TEXT, TINY_T5_TEXT], ids=["llama", "opt", "t5"])
def test_remat_policy_wraps_each_layer_stack(text):
    """A named remat policy puts each layer stack's scanned block under jax.checkpoint: once per
    stack, whatever its depth (T5 has two LM stacks), and each Q-Former layer kept outside a
    stack once (the tiny Q-Former's two layers are both outside: one group would be its last)."""
    fns, args = _remat_case(text, "full")
    traced = [str(jax.make_jaxpr(fn)(*args)) for fn in fns]
    llm_stacks = 2 if isinstance(text, T5Config) else 1
    vision_stacks, qformer_tail = 1, TINY.qformer.num_layers
    assert "remat" not in traced[0] and traced[1].count("remat") == llm_stacks + vision_stacks + qformer_tail


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "minimal"])
def test_remat_policies_give_the_same_gradients(policy):
    fns, args = _remat_case(TINY.text, policy)
    (loss, _), grads = jax.jit(fns[0])(*args)
    (loss_r, _), grads_r = jax.jit(fns[1])(*args)
    assert float(loss) == pytest.approx(float(loss_r), rel=1e-6)
    deltas = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-30)),
                                          grads, grads_r))
    assert max(deltas) <= 1e-5


def test_train_config_remat_names_a_policy():
    assert TrainConfig(remat=True).remat == "full" and TrainConfig(remat=False).remat == "none"
    assert TrainConfig(remat="dots_saveable").remat == "dots_saveable"
    with pytest.raises(ValueError, match="remat policy"):
        TrainConfig(remat="sometimes")


# ----------------------------------------------------------------------------- sharded training



def run_steps(mesh, trainable_set, batches, steps=5):
    params = initial_params(TINY, 3)
    trainable, frozen = tr.split(params, trainable_set)
    tx = make_optimizer(OPTIM)
    placement = Placement(TINY, trainable_set, tx, mesh)
    initial = jax.device_get(trainable)  # before the steps donate (and delete) the state's buffers
    state = placement.put_state(init_state(trainable, tx))
    frozen_before = jax.device_get(frozen)
    frozen = placement.put_frozen(frozen)
    step = make_train_step(TINY, tx, OPTIM, placement, batch_size=8, prepend_queries=True)
    losses = []
    for b in batches[:steps]:
        inputs = {k: jax.device_put(v, placement.batch(8)) if mesh is not None else v for k, v in b.items()}
        state, metrics = step(state, frozen, inputs)
        losses.append(float(metrics["loss"]))
    return dict(losses=np.array(losses), state=state, frozen=frozen, frozen_before=frozen_before,
                initial=initial, placement=placement)


@pytest.fixture(scope="module")
def sharded_runs():
    layout = TextLayout.for_model(TINY, qformer_cls=1, qformer_sep=2)
    rng = np.random.default_rng(0)
    batches = [token_batch(layout, rng, batch=8) for _ in range(5)]
    single = run_steps(None, "qformer+llm", batches)
    mesh = make_mesh("fsdp=4,data=2")
    sharded = run_steps(mesh, "qformer+llm", batches)
    return single, sharded


def test_mesh_matches_single_device(sharded_runs):
    single, sharded = sharded_runs
    rel = np.abs(sharded["losses"] - single["losses"]) / single["losses"]
    print("losses 1 device:", single["losses"], "fsdp=4 x data=2:", sharded["losses"], "max rel", rel.max())
    assert rel.max() <= 1e-5
    assert single["losses"][-1] < single["losses"][0]
    # the trainable LLM really is split over fsdp (embed dim 56 / 4), moments included
    kernel = sharded["state"].params["llm"]["layers"]["mlp"]["up_proj"]["kernel"]  # stacked [L, D, F]
    assert {s.data.shape for s in kernel.addressable_shards} == {(TINY.text.num_layers, 14, 96)}
    mu = sharded["state"].opt_state[1][0].mu["llm"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding == kernel.sharding


def test_frozen_params_unchanged_and_have_no_optimizer_state(sharded_runs):
    for run in sharded_runs:
        after = jax.device_get(run["frozen"])
        same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), after, run["frozen_before"])
        assert all(jax.tree_util.tree_leaves(same)) and set(after) == {"vision"}
        moved = flatten(jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b),
                                               jax.device_get(run["state"].params), run["initial"]))
        # every trainable param was updated, except the last Q-Former layer's text FFN biases and
        # norm: only query outputs leave the Q-Former, so that FFN gets no gradient (as in HF);
        # its kernels still move by weight decay
        last = f"qformer/layers_{TINY.qformer.num_layers - 1}/text_ffn"
        initial = flatten(run["initial"])
        assert {k for k, v in moved.items() if not v} == {k for k in moved
                                                         if k.startswith(last) and not decays(k, initial[k])}
        # optimizer moments exist for trainable params only
        mu = run["state"].opt_state[1][0].mu
        assert set(flatten(mu)) == set(flatten(run["initial"]))


def test_checkpoint_restores_onto_another_mesh(sharded_runs, tmp_path):
    _, sharded = sharded_runs
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    ckpt.save(5, sharded["state"], {"position": 40, "seed": 0})
    ckpt.wait()
    other = make_mesh("fsdp=2,tensor=2")  # 4 devices, a different layout
    tx = make_optimizer(OPTIM)
    placement = Placement(TINY, "qformer+llm", tx, other)
    trainable = tr.split(abstract_params(TINY), "qformer+llm")[0]
    state, data, _ = ckpt.restore(placement.abstract_state(trainable))
    ckpt.close()
    assert data == {"position": 40, "seed": 0} and int(state.step) == 5
    equal = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                   jax.device_get(state), jax.device_get(sharded["state"]))
    assert all(jax.tree_util.tree_leaves(equal))
    kernel = state.params["llm"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.mesh.shape == other.shape
    assert {s.data.shape for s in kernel.addressable_shards} == {(TINY.text.num_layers, 28, 48)}  # fsdp=2 x tensor=2


# ----------------------------------------------------------------------------- the loop, data, resume

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("shapes")), train=512, eval=64, size=32, seed=0)


def loop_config(shapes, directory, **changes):
    base = dict(model="tiny-instructblip-vicuna", train_data=shapes["train"], tokenizer=shapes["tokenizer"],
                trainable="qformer", mesh="fsdp=4,data=2", batch_size=8, steps=4, progress=False,
                max_input_len=16, max_output_len=4, max_qformer_len=16,
                optim=dict(lr=1e-3, warmup_lr=0.0, warmup_steps=1, total_steps=4),
                log_file=os.path.join(directory, "log.jsonl"))
    return TrainConfig.from_dict({**base, **changes})


def test_killed_and_resumed_run_is_bitwise_equal(shapes, tmp_path):
    straight = train(loop_config(shapes, str(tmp_path / "a")))
    killed_dir = str(tmp_path / "b")
    cfg = loop_config(shapes, killed_dir, checkpoint_dir=os.path.join(killed_dir, "ckpt"), checkpoint_every=2)
    stopped = train(cfg, stop_after=3)  # "killed" after update 3; the newest checkpoint is update 2
    probe = Checkpointer(cfg.checkpoint_dir)
    assert stopped["stopped"] and probe.latest_step() == 2
    probe.close()
    export_dir = str(tmp_path / "exported")
    resumed = train(cfg.updated(export_dir=export_dir))  # restores update 2 (params, Adam state, data
    # position), runs 3 and 4, then writes the model in HF layout
    a, b = jax.device_get(straight["state"]), jax.device_get(resumed["state"])
    equal = jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert int(b.step) == 4 and all(jax.tree_util.tree_leaves(equal))
    log = [json.loads(line) for line in open(cfg.log_file)]
    losses = [r["loss"] for r in log if r.get("event") == "train"]
    straight_losses = [r["loss"] for r in map(json.loads, open(tmp_path / "a" / "log.jsonl")) if r.get("event") == "train"]
    assert losses == straight_losses[:3] + straight_losses[2:]  # update 3 replayed identically
    exported = jblip.load_pretrained(export_dir)  # the loader reads the export back, bit for bit
    merged = flatten(jax.device_get(tr.merge(resumed["state"].params, resumed["frozen"])))
    assert all(np.array_equal(np.asarray(v), merged[k]) for k, v in flatten(exported.params).items())
    assert os.path.isfile(os.path.join(export_dir, "qformer_tokenizer", "tokenizer.json"))


@pytest.mark.slow
def test_tiny_model_learns_colours(shapes, tmp_path):
    """Held-out exact match rises from chance to >= 90% (greedy generation through the eval loop)."""
    cfg = TrainConfig.from_dict(dict(
        model="tiny-instructblip-vicuna", train_data=shapes["train"], eval_data=shapes["eval"],
        tokenizer=shapes["tokenizer"], trainable="all", init_std=0.1, mesh="data=1", batch_size=32, steps=300,
        optim=dict(lr=2e-3, warmup_lr=0.0, warmup_steps=20, total_steps=300), augment=False,
        max_input_len=16, max_output_len=4, max_qformer_len=16, max_new_tokens=3, eval_at_start=True,
        eval_batch_size=64, progress=False, log_file=str(tmp_path / "log.jsonl")))
    result = train(cfg)
    evals = [r for r in map(json.loads, open(cfg.log_file)) if r.get("event") == "eval"]
    print("held-out exact match:", [(e["step"], e["accuracy"]) for e in evals])
    assert evals[0]["step"] == 0 and evals[0]["accuracy"] <= 0.34  # chance: 1/4 shape colours, 1/3 backgrounds
    assert result["eval_accuracy"] >= 0.9


def test_demo_stage_one_writes_a_loadable_model_with_a_trained_vit(tmp_path):
    """`jblip train --recipe demo` starts from train.vision_pretrain.initial_model: the ViT
    pretrained alone, the rest random, in HF layout with the synthetic tokenizers."""
    import jblip
    from jblip.train.build import initial_params
    from jblip.train.vision_pretrain import initial_model
    config = PRESETS["tiny-instructblip-vicuna"]
    path = initial_model(config, str(tmp_path / "start"), steps=3, log=lambda line: None)
    model = jblip.load_pretrained(path)
    fresh = initial_params(config, 0, 0.1)
    moved = jax.tree_util.tree_map(lambda a, b: not np.allclose(np.asarray(a), np.asarray(b)),
                                   model.params["vision"], fresh["vision"])
    kept = jax.tree_util.tree_map(lambda a, b: np.allclose(np.asarray(a), np.asarray(b)),
                                  model.params["projection"], fresh["projection"])
    assert any(jax.tree_util.tree_leaves(moved)) and all(jax.tree_util.tree_leaves(kept))
    assert model.generate_text(np.zeros((28, 28, 3), np.uint8), "What colour is the shape?", max_new_tokens=2)


# ----------------------------------------------------------------------------- labels and data order (no compiling)

@pytest.mark.slow
def test_grain_worker_processes_give_the_same_batches_as_threads(shapes):
    """Decoding in grain worker processes (spawned: ~10 s here) instead of threads changes nothing."""
    from jblip.train.data import BatchStream, Encoder, read_jsonl
    from jblip.text_processing import TextTokenizer
    records = read_jsonl(shapes["train"])
    tok = TextTokenizer.from_dir(shapes["tokenizer"])
    encoder = Encoder(TextLayout.for_model(TINY, qformer_cls=4, qformer_sep=5), tok, tok)
    threads = BatchStream(records, encoder, 8, 28, seed=3, workers=2, process_index=0, process_count=1)
    expected = [next(threads) for _ in range(3)][1:]
    processes = BatchStream(records, encoder, 8, 28, seed=3, workers=1, processes=2, process_index=0,
                            process_count=1)
    processes.restore({"position": 8, "seed": 3})  # resumed mid-stream, in worker processes
    try:
        for want in expected:
            got = next(processes)
            assert [k for k in want if not np.array_equal(got[k], want[k])] == []
    finally:
        processes.close()


def test_label_layout_decoder_only_and_t5():
    vicuna = TextLayout(family="llama", num_queries=3, image_token=99, bos=2, eos=2, pad=0, qformer_cls=1,
                        qformer_sep=2, max_input_len=4, max_output_len=3, max_qformer_len=4)
    ex = encode_example([10, 11, 12, 13, 14], [20, 21, 22], vicuna)
    # instruction cut on the left (BOS kept), answer + EOS cut on the right (EOS lost, as in LAVIS)
    assert ex["input_ids"] == [99, 99, 99, 2, 12, 13, 14, 20, 21, 22]
    assert ex["labels"] == [-100] * 7 + [20, 21, 22]
    assert ex["qformer_ids"] == [1, 13, 14, 2]
    short = encode_example([10], [20], vicuna)
    batch = collate([ex, short], vicuna)
    assert batch["input_ids"][1].tolist() == [99, 99, 99, 2, 10, 20, 2] + [0] * 9
    assert batch["labels"][1].tolist() == [-100] * 5 + [20, 2] + [-100] * 9
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 9
    assert batch["target_positions"].tolist() == [[7, 8, 9] + [1] * 5, [5, 6] + [1] * 6]
    assert batch["target_labels"].tolist() == [[20, 21, 22] + [-100] * 5, [20, 2] + [-100] * 6]

    t5 = dataclasses.replace(vicuna, family="t5", bos=None, eos=1, image_token=None, max_output_len=4)
    ex = encode_example([10, 11, 12, 13, 14], [20, 21], t5)
    assert ex["input_ids"] == [12, 13, 14, 1]                       # encoder: instruction + EOS, no queries
    assert ex["labels"] == [20, 21, 1] and ex["decoder_input_ids"] == [0, 20, 21]
    batch = collate([ex, encode_example([10], [20], t5)], t5)
    assert batch["decoder_input_ids"][1].tolist()[:3] == [0, 20, 0] and batch["labels"][1].tolist()[:3] == [20, 1, -100]


def test_data_order_is_seeded_resumable_and_split_over_hosts(shapes):
    from jblip.train.data import BatchStream, Encoder, read_jsonl
    from jblip.text_processing import TextTokenizer
    records = read_jsonl(shapes["train"])
    tok = TextTokenizer.from_dir(shapes["tokenizer"])
    encoder = Encoder(TextLayout.for_model(TINY, qformer_cls=4, qformer_sep=5), tok, tok)
    stream = lambda **kw: BatchStream(records, encoder, 8, 28, seed=3, workers=1, **kw)
    one = stream(process_index=0, process_count=1)
    first, second = next(one), next(one)
    hosts = [stream(process_index=h, process_count=2) for h in range(2)]
    halves = [next(h) for h in hosts]
    for key in first:  # the two hosts' rows are the single host's global batch, in order
        assert np.array_equal(np.concatenate([h[key] for h in halves]), first[key]), key
    resumed = stream(process_index=0, process_count=1)
    resumed.restore(one.state() | {"position": 8})
    again = next(resumed)
    assert all(np.array_equal(again[k], second[k]) for k in second)  # same examples, crops and flips
    other_seed = BatchStream(records, encoder, 8, 28, seed=4, workers=1, process_index=0, process_count=1)
    assert not np.array_equal(next(other_seed)["pixel_values"], first["pixel_values"])
    with pytest.raises(ValueError, match="seed"):
        other_seed.restore(one.state())
