"""Decoding speed: jblip against KerasHub's BLIP-2 (Keras 3, JAX backend) with the same shapes.

    python benchmarks/keras_hub.py [--keras-python V/bin/python] [--threads 1] [--quick]
                                   [--cases opt_greedy_b1,...] [--new N] [--repeats N]

KerasHub ships BLIP-2 with OPT (`BLIP2CausalLM`) and Flan-T5 (`BLIP2Seq2SeqLM`) language
models; on the JAX backend it is the other JAX implementation. Both sides are built from one
HF-format config (`hf_config()`, `t5_hf_config()`) with random weights of the same distribution
(N(0, 0.02), unit norm scales, zero biases); the script asserts equal parameter counts per tower
(vision; Q-Former with its query tokens and the projection into the LM; language model).

Each side runs in its own worker process (this file with `--worker jblip|keras`): jblip with
this python, KerasHub with `--keras-python` (default: $JBLIP_KERAS_PYTHON), a separate virtual
environment, since keras-hub's declared dependencies pull in TensorFlow. `keras_python_help()`
prints the recipe. Both workers are pinned to the same `--threads` cores (before JAX starts, so
XLA sizes its thread pool to them), KERAS_BACKEND=jax, float32. They stay alive side by side
and the timed calls alternate between them, so machine noise hits both alike.

Per case: identical inputs (random pixels, an 8-token prompt), greedy, exactly `--new` new
tokens per row on both sides (jblip: min_new_tokens = max_new_tokens; KerasHub:
`stop_token_ids=None`, which runs its sampler loop to the end of the padded sequence, checked by
two runs whose unwritten slots would differ). The timed call is the whole `generate` call, image
towers included, until the tokens are on the host. The first call compiles (KerasHub jits one
generate function around its sampler's while loop; jblip jits its decode program); compile time
is reported as first call minus the median steady call, and a timed call that compiles anything
(counted through `jax.monitoring`) fails the run: same shapes every call on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REPLY = "@@keras-hub-bench "  # marks the workers' reply lines among whatever else a library prints
PROMPT = 8                    # prompt tokens per row
OPT_BOS, OPT_PAD, OPT_EOS = 2, 1, 50118
T5_PAD, T5_EOS, T5_START = 0, 1, 0
CASES = (("opt_greedy_b1", "opt", 1), ("opt_greedy_b8", "opt", 8),
         ("t5_greedy_b1", "t5", 1), ("t5_greedy_b8", "t5", 8))

_VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
               patch_size=14, image_size=224, layer_norm_eps=1e-6, qkv_bias=True)
_QFORMER = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
                encoder_hidden_size=384, cross_attention_frequency=2, max_position_embeddings=512,
                layer_norm_eps=1e-12)
_QUICK_TOWERS = dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=56),
                     qformer=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  encoder_hidden_size=64))


def _towers(quick: bool) -> dict:
    vision, qformer = dict(_VISION), dict(_QFORMER)
    if quick:
        vision.update(_QUICK_TOWERS["vision"])
        qformer.update(_QUICK_TOWERS["qformer"])
    return dict(model_type="blip-2", num_query_tokens=8 if quick else 32, vision_config=vision,
                qformer_config=qformer)


def hf_config(quick: bool = False) -> dict:
    """The OPT case as a HF BLIP-2 config dict: ViT 6x384, Q-Former 4x384, OPT 8x512 (71,474,048
    params); `quick`: tiny shapes for a smoke run."""
    text = dict(model_type="opt", vocab_size=50272, hidden_size=512, ffn_dim=2048, num_hidden_layers=8,
                num_attention_heads=8, max_position_embeddings=2048, word_embed_proj_dim=512,
                do_layer_norm_before=True, activation_function="relu", layer_norm_eps=1e-5,
                bos_token_id=OPT_BOS, pad_token_id=OPT_PAD, eos_token_id=OPT_EOS)
    if quick:
        text.update(vocab_size=1000, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64)
    return dict(_towers(quick), text_config=text)


def t5_hf_config(quick: bool = False) -> dict:
    """The Flan-T5 case: same image towers, a small T5 (d_model 512, 8 heads of 64, gated-gelu
    d_ff 1024, 4 encoder + 4 decoder layers, vocab 32128, untied head as in Flan-T5)."""
    text = dict(model_type="t5", vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=4,
                num_decoder_layers=4, num_heads=8, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                tie_word_embeddings=False, pad_token_id=T5_PAD, eos_token_id=T5_EOS,
                decoder_start_token_id=T5_START)
    if quick:
        text.update(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4)
    return dict(_towers(quick), text_config=text)


def family_config(family: str, quick: bool) -> dict:
    return hf_config(quick) if family == "opt" else t5_hf_config(quick)


def make_inputs(cfg: dict, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pixels [B, H, W, 3] (float32) and prompt ids [B, PROMPT], the same in every process."""
    rng = np.random.default_rng(seed)
    size, vocab = cfg["vision_config"]["image_size"], cfg["text_config"]["vocab_size"]
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(4, vocab - 1, (batch, PROMPT)).astype(np.int32)
    return pixels, ids


def keras_python_help() -> str:
    from importlib.metadata import version
    jax = version("jax")
    return ("KerasHub runs in its own virtual environment (keras-hub's declared dependencies pull in "
            "TensorFlow, which building BLIP-2 from a config does not need). Make one with the same jax:\n"
            f"    python -m venv V && V/bin/pip install jax=={jax} keras absl-py rich namex h5py optree "
            "ml-dtypes packaging regex sentencepiece tokenizers kagglehub && V/bin/pip install --no-deps keras-hub\n"
            "then pass --keras-python V/bin/python or set JBLIP_KERAS_PYTHON=V/bin/python.")


# ----------------------------------------------------------------------------- the two sides

def _count(tree) -> int:
    import jax
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


class JblipSide:
    """jblip's BLIP-2 from the HF config, random weights (benchmarks/accelerator.random_params)."""

    def __init__(self, cfg: dict):
        sys.path.insert(0, ROOT)
        from benchmarks.accelerator import random_params
        from jblip.config import from_hf_config
        from jblip.pretrained import VisionLanguageModel
        config = from_hf_config(cfg, name="keras-hub-bench").with_precision("float32")
        params = random_params(config)
        self.model = VisionLanguageModel(config, params)
        self.text = cfg["text_config"]
        self.towers = dict(vision=_count(params["vision"]),
                           qformer=_count(params["qformer"]) + _count(params["projection"]),
                           lm=_count(params["llm"]))

    def generate(self, pixels, ids, new: int, sentinel: int) -> np.ndarray:
        """New tokens [B, new]; checks each row's length (`sentinel` is KerasHub's concern)."""
        out = self.model.generate(pixel_values=pixels, input_ids=ids, attention_mask=np.ones_like(ids),
                                  max_new_tokens=new, min_new_tokens=new,
                                  eos_token_ids=(self.text["eos_token_id"],), pad_token_id=self.text["pad_token_id"])
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        if tokens.shape != (len(ids), new) or not np.all(lengths == new):
            raise AssertionError(f"jblip produced {tokens.shape} tokens, lengths {lengths.tolist()}; wanted {new} a row")
        return tokens


def _import_keras_hub():
    # this file is called keras_hub.py: drop its folder from the path so the real package imports
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != HERE]
    sys.modules.pop("keras_hub", None)
    os.environ["KERAS_BACKEND"] = "jax"
    import warnings
    warnings.filterwarnings("ignore", message=".*does not support masking.*")
    import keras
    import keras_hub
    keras.config.set_floatx("float32")
    return keras, keras_hub


class KerasSide:
    """KerasHub's BLIP2CausalLM (OPT) or BLIP2Seq2SeqLM (Flan-T5), built from the same HF config."""

    def __init__(self, cfg: dict):
        keras, keras_hub = _import_keras_hub()
        m = keras_hub.models
        v, q, t = cfg["vision_config"], cfg["qformer_config"], cfg["text_config"]
        queries = cfg["num_query_tokens"]
        vision = m.BLIP2VisionEncoder(
            image_size=v["image_size"], patch_size=v["patch_size"], num_layers=v["num_hidden_layers"],
            num_heads=v["num_attention_heads"], hidden_dim=v["hidden_size"], intermediate_dim=v["intermediate_size"],
            use_patch_bias=True, use_class_token=True, use_mha_bias=True, use_mlp_bias=True, dropout_rate=0.0,
            layer_norm_epsilon=v["layer_norm_eps"], initializer_range=0.02)
        qformer = m.BLIP2QFormer(
            num_query_tokens=queries, num_layers=q["num_hidden_layers"], num_heads=q["num_attention_heads"],
            hidden_dim=q["hidden_size"], intermediate_dim=q["intermediate_size"], vision_dim=q["encoder_hidden_size"],
            cross_attention_frequency=q["cross_attention_frequency"], dropout=0.0, layer_norm_epsilon=q["layer_norm_eps"])
        self.seq2seq = t["model_type"] == "t5"
        if self.seq2seq:
            if t["num_layers"] != t["num_decoder_layers"]:
                raise ValueError("KerasHub's BLIP2FlanT5 has as many decoder layers as encoder layers")
            lm = m.BLIP2FlanT5(vocabulary_size=t["vocab_size"], num_layers=t["num_layers"], num_heads=t["num_heads"],
                               hidden_dim=t["d_model"], intermediate_dim=t["d_ff"], num_query_tokens=queries,
                               qformer_hidden_dim=q["hidden_size"], key_value_dim=t["d_kv"], dropout=0.0,
                               layer_norm_epsilon=t["layer_norm_epsilon"])
        else:
            lm = m.BLIP2CustomOPT(vocabulary_size=t["vocab_size"], num_layers=t["num_hidden_layers"],
                                  num_heads=t["num_attention_heads"], hidden_dim=t["hidden_size"],
                                  intermediate_dim=t["ffn_dim"], num_query_tokens=queries, dropout=0.0,
                                  max_sequence_length=t["max_position_embeddings"], qformer_hidden_dim=q["hidden_size"],
                                  layer_norm_epsilon=t["layer_norm_eps"])
        backbone = m.BLIP2Backbone(vision_encoder=vision, qformer=qformer, language_model=lm)
        task = m.BLIP2Seq2SeqLM if self.seq2seq else m.BLIP2CausalLM
        self.model = task(backbone=backbone, preprocessor=None)
        self.model.compile(sampler="greedy")
        _redraw(self.model)
        n_vision = vision.count_params()
        n_qformer = qformer.count_params() + lm.language_projection.count_params()
        self.towers = dict(vision=n_vision, qformer=n_qformer, lm=self.model.count_params() - n_vision - n_qformer)

    def generate(self, pixels, ids, new: int, sentinel: int) -> np.ndarray:
        """New tokens [B, new]. Without a preprocessor KerasHub decodes into the slots its padding
        mask leaves open; they start as `sentinel`, so two runs with different sentinels agree only
        if every slot was written."""
        batch = len(ids)
        if self.seq2seq:
            start = np.full((batch, 1), T5_START, np.int32)
            inputs = dict(images=pixels, encoder_token_ids=ids, encoder_padding_mask=np.ones_like(ids),
                          decoder_token_ids=_open_slots(start, new, sentinel),
                          decoder_padding_mask=_open_mask(batch, 1, new))
            key, mask_key, offset = "decoder_token_ids", "decoder_padding_mask", 1
        else:
            inputs = dict(images=pixels, token_ids=_open_slots(ids, new, sentinel),
                          padding_mask=_open_mask(batch, ids.shape[1], new))
            key, mask_key, offset = "token_ids", "padding_mask", ids.shape[1]
        out = self.model.generate(inputs, stop_token_ids=None)
        tokens = np.asarray(out[key])[:, offset:]
        if tokens.shape != (batch, new) or not np.all(np.asarray(out[mask_key])):
            raise AssertionError(f"KerasHub produced {tokens.shape} new tokens; wanted {new} a row")
        return tokens


def _open_slots(prefix, new: int, sentinel: int):
    return np.concatenate([prefix, np.full((len(prefix), new), sentinel, np.int32)], axis=1)


def _open_mask(batch: int, filled: int, new: int):
    return np.concatenate([np.ones((batch, filled), np.int32), np.zeros((batch, new), np.int32)], axis=1)


def _redraw(model, seed: int = 0, std: float = 0.02):
    """KerasHub's weights redrawn like jblip's random_params: N(0, std), norm scales 1, biases 0."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        name = w.path.rsplit("/", 1)[-1]
        if name == "gamma" or (name == "weight" and "norm" in w.path):
            w.assign(np.ones(w.shape, np.float32))
        elif name in ("beta", "bias"):
            w.assign(np.zeros(w.shape, np.float32))
        else:
            w.assign((std * rng.standard_normal(w.shape)).astype(np.float32))


# ----------------------------------------------------------------------------- worker process

def worker(side: str, cores: list[int], quick: bool, new: int):
    """Pins itself, then answers one JSON line per command read from stdin:
    {"op": "prepare", "case": name} -> towers, first-call seconds (compiles); also checks the
    new-token count; {"op": "time"} -> seconds of one steady call and the compiles it caused."""
    os.sched_setaffinity(0, cores)  # before JAX starts: XLA sizes its thread pool from this mask
    import jax
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _s, **_: compiles.append(event) if event.startswith("/jax/core/compile/") else None)
    built, run, build_s = {}, None, 0.0
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "prepare":
            name, family, batch = next(c for c in CASES if c[0] == cmd["case"])
            cfg = family_config(family, quick)
            if family not in built:
                built.clear()  # one model held at a time
                build_s, built[family] = _timed(lambda: (JblipSide if side == "jblip" else KerasSide)(cfg))
            model = built[family]
            pixels, ids = make_inputs(cfg, batch)
            first_s, tokens = _timed(lambda: model.generate(pixels, ids, new, sentinel=3))
            again = model.generate(pixels, ids, new, sentinel=5)
            if not np.array_equal(tokens, again):
                raise AssertionError(f"{side}: two runs of {name} gave different tokens (slots left unwritten?)")
            run = lambda: model.generate(pixels, ids, new, sentinel=3)  # noqa: E731
            reply = dict(towers=model.towers, first_s=first_s, build_s=build_s,
                         versions=_versions(side), tokens_per_row=int(tokens.shape[1]))
        else:
            compiles.clear()
            seconds, _ = _timed(run)
            reply = dict(s=seconds, compiles=len(compiles))
        print(REPLY + json.dumps(reply), flush=True)


def _versions(side: str) -> dict:
    import jax
    if side == "jblip":
        return dict(jax=jax.__version__)
    import keras
    import keras_hub
    return dict(jax=jax.__version__, keras=keras.__version__, keras_hub=keras_hub.__version__)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------- coordinating process

class Worker:
    def __init__(self, side: str, python: str, cores: list[int], quick: bool, new: int):
        self.side = side
        self.log = tempfile.TemporaryFile("w+")
        env = dict(os.environ, KERAS_BACKEND="jax")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times must be cold
        cmd = [python, os.path.abspath(__file__), "--worker", side, "--cores", ",".join(map(str, cores)),
               "--new", str(new)] + (["--quick"] if quick else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=ROOT)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.log.seek(0)
        tail = "".join(self.log.readlines()[-30:])
        raise RuntimeError(f"the {self.side} worker exited (code {self.proc.wait()}):\n{tail}")

    def close(self):
        """End of input ends the worker's loop; one still busy (an error elsewhere) is killed."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def check_towers(family: str, prep: dict):
    """Prints the per-tower counts (and model build times); raises if any tower differs."""
    ours, theirs = prep["jblip"]["towers"], prep["keras"]["towers"]
    row = " ".join(f"{k}={ours[k]}" + ("" if ours[k] == theirs[k] else f"/keras={theirs[k]}") for k in ours)
    print(f"towers family={family} {row} total={sum(ours.values())} jblip_build_s={prep['jblip']['build_s']:.1f} "
          f"keras_build_s={prep['keras']['build_s']:.1f}", flush=True)
    if ours != theirs:
        raise AssertionError(f"{family}: parameter counts per tower differ (jblip / keras): {ours} / {theirs}")


def fmt(row: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def prepare(workers: dict, name: str, new: int) -> dict:
    """Builds (once per family) and compiles the case on both sides; checks the token counts."""
    prep = {side: w.ask(op="prepare", case=name) for side, w in workers.items()}
    for side, p in prep.items():
        if p["tokens_per_row"] != new:
            raise AssertionError(f"{side} produced {p['tokens_per_row']} tokens a row, wanted {new}")
    return prep


def time_case(workers: dict, prep: dict, name: str, batch: int, new: int, repeats: int) -> dict:
    """Steady calls alternating between the sides; medians, tokens/s, ratio (> 1: jblip faster)."""
    times = {side: [] for side in workers}
    order = list(workers)
    for r in range(repeats):
        for side in (order if r % 2 == 0 else order[::-1]):
            reply = workers[side].ask(op="time")
            if reply["compiles"]:
                raise AssertionError(f"{side}: a timed call of {name} compiled ({reply['compiles']} events)")
            times[side].append(reply["s"])
    med = {side: statistics.median(t) for side, t in times.items()}
    tokens = batch * new
    return dict(case=name, jblip_tok_s=tokens / med["jblip"], keras_tok_s=tokens / med["keras"],
                ratio=med["keras"] / med["jblip"],
                jblip_compile_s=max(prep["jblip"]["first_s"] - med["jblip"], 0.0),
                keras_compile_s=max(prep["keras"]["first_s"] - med["keras"], 0.0),
                params=sum(prep["jblip"]["towers"].values()), jblip_s=med["jblip"], keras_s=med["keras"],
                new_tokens=new)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keras-python", default=os.environ.get("JBLIP_KERAS_PYTHON"),
                        help="python of a venv with keras-hub (default: $JBLIP_KERAS_PYTHON)")
    parser.add_argument("--threads", type=int, default=1, help="CPU cores both sides are pinned to (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few tokens (smoke run)")
    parser.add_argument("--cases", help="comma-separated subset of " + ",".join(c[0] for c in CASES))
    parser.add_argument("--new", type=int, help="new tokens per row (default 64; --quick 6)")
    parser.add_argument("--repeats", type=int, help="timed calls per side and case, median reported (default 3)")
    parser.add_argument("--worker", choices=("jblip", "keras"), help=argparse.SUPPRESS)
    parser.add_argument("--cores", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    new = args.new or (6 if args.quick else 64)
    if args.worker:
        return worker(args.worker, [int(c) for c in args.cores.split(",")], args.quick, new)

    if not args.keras_python:
        parser.error("no python with KerasHub: pass --keras-python or set JBLIP_KERAS_PYTHON.\n" + keras_python_help())
    if not os.path.exists(args.keras_python):
        parser.error(f"--keras-python {args.keras_python} does not exist.\n" + keras_python_help())
    names = args.cases.split(",") if args.cases else [c[0] for c in CASES]
    unknown = set(names) - {c[0] for c in CASES}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {[c[0] for c in CASES]}")
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(available):
        parser.error(f"--threads must be 1..{len(available)} (the cores this process may use)")
    cores, repeats = available[:args.threads], args.repeats or (2 if args.quick else 3)

    workers = {"jblip": Worker("jblip", sys.executable, cores, args.quick, new),
               "keras": Worker("keras", args.keras_python, cores, args.quick, new)}
    results, checked = [], set()
    try:
        for name, family, batch in (c for c in CASES if c[0] in names):
            prep = prepare(workers, name, new)
            if not checked:
                versions = dict(prep["keras"]["versions"], jblip_jax=prep["jblip"]["versions"]["jax"])
                print(fmt(dict(threads=args.threads, cores=",".join(map(str, cores)), new_tokens=new,
                               repeats=repeats, prompt_tokens=PROMPT, **versions)), flush=True)
                if versions["jax"] != versions["jblip_jax"]:
                    print("warning: the two sides run different jax versions", file=sys.stderr)
            if family not in checked:
                check_towers(family, prep)
                checked.add(family)
            row = time_case(workers, prep, name, batch, new, repeats)
            results.append(row)
            print(fmt(row), flush=True)
    finally:
        for w in workers.values():
            w.close()
    return results


if __name__ == "__main__":
    main()
