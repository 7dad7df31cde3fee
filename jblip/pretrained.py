"""`load_pretrained`: a HF-format checkpoint directory -> a ready-to-run model object."""
from __future__ import annotations

import functools
import os
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jblip import families, sharding
from jblip.config import ModelConfig, Precision
from jblip.compiler_options import decode_options
from jblip.generate import GenerateOutput, check_rows
from jblip.generate import decode as decode_tokens
from jblip.generate import generate as generate_tokens
from jblip.generate import prefill as prefill_tokens
from jblip.layer_buffers import layer_views
from jblip.model import BlipModel, abstract_params
from jblip.sampling import SamplerConfig, bucket, longest_output, split
from jblip.scan import LAYER_LOOPS, layer_loop_for


class InputError(ValueError):
    """Bad user input (shapes, layouts, lengths), with a message that names the problem."""


def _as_nhwc(pixel_values, channels: int):
    """Images [B, H, W, C] or videos [B, T, H, W, C] as float32 (PyTorch's channels-first
    layouts, [B, C, H, W] and [B, T, C, H, W], are unambiguous, so they are accepted too)."""
    x = np.asarray(pixel_values) if not isinstance(pixel_values, jax.Array) else pixel_values
    if x.ndim not in (4, 5):
        raise InputError(f"pixel_values must be 4-D images [batch, height, width, {channels}] or 5-D videos "
                         f"[batch, frames, height, width, {channels}], got shape {tuple(x.shape)}")
    if x.shape[-1] == channels:
        return jnp.asarray(x, jnp.float32)
    if x.shape[-3] == channels:
        return jnp.moveaxis(jnp.asarray(x, jnp.float32), -3, -1)
    layout = "NHWC [batch, height, width, channels]" if x.ndim == 4 else "[batch, frames, height, width, channels]"
    raise InputError(f"pixel_values shape {tuple(x.shape)} has no channel axis of size {channels} (expected {layout})")


def num_frames(pixels) -> int:
    """Frames per sample: T of video pixels [B, T, H, W, C], 1 for images."""
    return pixels.shape[1] if pixels.ndim == 5 else 1


def check_token_ids(ids, vocab: int, what: str):
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise InputError(f"{what} holds ids outside the vocabulary [0, {vocab}): min {ids.min()}, max {ids.max()}")


@functools.lru_cache(maxsize=4)
def _boxed_abstract(config: ModelConfig):
    """Param shapes with logical axis names (one eval_shape per config, shared by loader and model)."""
    return abstract_params(config, boxed=True)


def _placed(value, target, abstract):
    """`value` on `target` sharding (zero-padded to the abstract shape); no-op if already there."""
    if isinstance(value, jax.Array) and value.sharding == target and value.shape == abstract.shape:
        return value
    return sharding.place(np.asarray(value).astype(abstract.dtype, copy=False), target, abstract.shape)


class VisionLanguageModel:
    """A config, a params pytree and jitted entry points for one InstructBLIP / BLIP-2 model."""

    def __init__(self, config: ModelConfig, params, path: str | None = None, mesh=None, rules=None,
                 layer_loop: str | None = None):
        """With a `mesh` (`jblip.sharding.make_mesh`), params live sharded on it per `rules`
        (default `sharding.LOGICAL_RULES`); params not yet placed are placed here (and the LM
        vocabulary padded, see `sharding.pad_vocab`). Entry points then run on the mesh.
        `layer_loop`: how the decode loop walks the LM's layers (`jblip.scan.LAYER_LOOPS`);
        None picks the one for the platform the model runs on."""
        if layer_loop is not None and layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop must be one of {', '.join(LAYER_LOOPS)}, got {layer_loop!r}")
        self.mesh = mesh
        self.rules = tuple(sharding.LOGICAL_RULES if rules is None else rules)
        self.param_shardings = None
        if mesh is not None:
            config = sharding.pad_vocab(config, mesh, self.rules)
            boxed = _boxed_abstract(config)
            self.param_shardings = sharding.param_shardings(boxed, mesh, self.rules)
            params = jax.tree_util.tree_map(_placed, params, self.param_shardings, nn.unbox(boxed))
        self.config = config
        self.params = params  # (the setter also drops buffers derived from the old params)
        self.module = BlipModel(config)
        self.path = path
        self.layer_loop = layer_loop or layer_loop_for(self.platform)
        self._entries = {}

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params):
        self._params = params
        self._loop_llm = None

    def _decode_llm_params(self):
        """The LM params the decode loop reads, for CPU programs: per-layer buffers aliasing the
        stacks (`jblip.layer_buffers`), made once. None elsewhere (the program uses the stacks)."""
        if self.layer_loop != "unrolled" or self.platform != "cpu":
            return None
        if self._loop_llm is None:
            self._loop_llm = layer_views(self.params["llm"])
        return self._loop_llm

    def __repr__(self):
        return f"VisionLanguageModel({self.config.name!r}, family={self.config.family}, type={self.config.model_type})"

    # ------------------------------------------------------------------ placement on the mesh
    def batch_sharding(self, batch: int):
        """Sharding of arrays with the batch on axis 0: split over the mesh's batch axes where
        the batch divides them, else replicated. None without a mesh."""
        if self.mesh is None:
            return None
        return jax.sharding.NamedSharding(self.mesh, sharding.batch_spec(batch, self.mesh, self.rules))

    def shard_inputs(self, inputs: dict) -> dict:
        """Host inputs (batch on axis 0; None values kept) -> device arrays, batch-sharded on the
        mesh when there is one. Every process passes the same global batch."""
        arrays = [v for v in inputs.values() if v is not None]
        if self.mesh is None or not arrays:
            return {k: None if v is None else jnp.asarray(v) for k, v in inputs.items()}
        target = self.batch_sharding(arrays[0].shape[0])

        def put(v):
            if v is None or (isinstance(v, jax.Array) and v.sharding == target):
                return v
            v = np.asarray(v)
            return sharding.place(v.astype(jax.dtypes.canonicalize_dtype(v.dtype), copy=False), target)
        return {k: put(v) for k, v in inputs.items()}

    @property
    def platform(self) -> str:
        """The platform the entry points compile for: the mesh's devices, else the default device."""
        devices = self.mesh.devices.flat if self.mesh is not None else jax.devices()
        return next(iter(devices)).platform

    @property
    def decode_options(self) -> dict | None:
        """Compiler options of this model's decode loops (`jblip.compiler_options`; None: XLA's defaults)."""
        return decode_options(self.platform, families.tied_head(self.config))

    def sharding_context(self):
        """Context for tracing jitted calls: activation constraints take effect on the mesh."""
        return sharding.activation_rules(self.mesh, self.rules)

    def _run(self, kind: str, inputs: dict, prepend_queries: bool = False):
        """One jitted entry point ("forward" or "encode"); on a mesh with params and batch
        in/out shardings, under the activation rules."""
        inputs = self.shard_inputs(inputs)
        batch = next(v for v in inputs.values() if v is not None).shape[0]
        out_sharding = self.batch_sharding(batch)
        key = (kind, prepend_queries, None if out_sharding is None else out_sharding.spec)
        if key not in self._entries:
            if kind == "forward":
                def fn(params, inputs):
                    return self.module.apply({"params": params}, prepend_queries=prepend_queries, **inputs)
            else:
                def fn(params, inputs):
                    return self.module.apply({"params": params}, **inputs, method=BlipModel.encode_image)
            shardings = {} if self.mesh is None else dict(
                in_shardings=(self.param_shardings, out_sharding), out_shardings=out_sharding)
            self._entries[key] = jax.jit(fn, **shardings)
        with self.sharding_context():
            return self._entries[key](self.params, inputs)

    def _qformer_inputs(self, batch, qformer_input_ids, qformer_attention_mask):
        if not self.config.qformer.use_text_input:
            if qformer_input_ids is not None:
                raise InputError("this BLIP-2 model's Q-Former takes no text: pass qformer_input_ids=None")
            return None, None
        if qformer_input_ids is None:
            raise InputError("InstructBLIP needs the instruction for the Q-Former: pass qformer_input_ids")
        ids = np.asarray(qformer_input_ids)
        if ids.ndim != 2 or ids.shape[0] != batch:
            raise InputError(f"qformer_input_ids must be [batch={batch}, length], got {ids.shape}")
        if ids.shape[1] > self.config.qformer.max_position_embeddings:
            raise InputError(f"instruction of {ids.shape[1]} Q-Former tokens exceeds the model's "
                             f"maximum of {self.config.qformer.max_position_embeddings}")
        check_token_ids(ids, self.config.qformer.vocab_size, "qformer_input_ids")
        mask = np.ones_like(ids) if qformer_attention_mask is None else np.asarray(qformer_attention_mask)
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)

    def query_layout(self, input_ids, frames: int = 1) -> bool:
        """True when the queries must be prepended (no placeholders in input_ids); a video of
        `frames` frames has frames * num_query_tokens placeholders per row."""
        ids = np.asarray(input_ids)
        token = self.config.image_token_index
        counts = np.zeros(ids.shape[0], int) if token is None else (ids == token).sum(-1)
        if np.all(counts == 0):
            return True
        q = self.config.num_query_tokens * frames
        if np.all(counts == q):
            return False
        what = "image" if frames == 1 else f"placeholder tokens for {frames} frames x {self.config.num_query_tokens}"
        raise InputError(f"each row of input_ids must hold either 0 or exactly {q} {what} placeholder "
                         f"tokens (id {token}); got counts {counts.tolist()}")

    def encode_image(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        """Projected query outputs [B, Q, D_llm] (videos [B, T, H, W, C]: [B, T*Q, D_llm])."""
        pixels = _as_nhwc(pixel_values, self.config.vision.num_channels)
        q_ids, q_mask = self._qformer_inputs(pixels.shape[0], qformer_input_ids, qformer_attention_mask)
        return self._run("encode", dict(pixel_values=pixels, qformer_ids=q_ids, qformer_mask=q_mask))

    def forward(self, pixel_values, input_ids, attention_mask=None, qformer_input_ids=None,
                qformer_attention_mask=None, decoder_input_ids=None):
        """Logits [B, L, V] (float32). Decoder-only: L covers the queries when they are prepended.
        `pixel_values`: images [B, H, W, C] or videos [B, T, H, W, C]."""
        pixels = _as_nhwc(pixel_values, self.config.vision.num_channels)
        batch = pixels.shape[0]
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] != batch:
            raise InputError(f"input_ids must be [batch={batch}, length], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        check_token_ids(ids, self.config.text.vocab_size, "input_ids")
        q_ids, q_mask = self._qformer_inputs(batch, qformer_input_ids, qformer_attention_mask)
        inputs = dict(pixel_values=pixels, input_ids=jnp.asarray(ids, jnp.int32),
                      attention_mask=jnp.asarray(mask, jnp.int32), qformer_ids=q_ids, qformer_mask=q_mask)
        if families.family(self.config).encoder_decoder:
            if decoder_input_ids is None:
                raise InputError("Flan-T5 models need decoder_input_ids (start with decoder_start_token_id "
                                 f"{self.config.text.decoder_start_token_id})")
            inputs["decoder_input_ids"] = jnp.asarray(decoder_input_ids, jnp.int32)
        return self._run("forward", inputs, self.query_layout(ids, num_frames(pixels)))

    __call__ = forward

    # ------------------------------------------------------------------ generation
    def default_sampler(self) -> SamplerConfig:
        text = self.config.text
        pad = max(getattr(text, "pad_token_id", 0) or 0, 0)
        eos = text.eos_token_id
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return SamplerConfig(eos_token_ids=eos, pad_token_id=pad)

    @functools.cached_property
    def _generate_jit(self):
        """generate's compiled program(s): one, or on CPU (untied heads) the prefill and the decode
        loop apart, each with its own compiler options (`jblip.compiler_options`)."""
        layer_loop = self.layer_loop
        options = self.decode_options
        if options is None:  # the decode loop compiles as the rest does: one program
            def run(params, loop_llm, static, rows, prepend_queries, **inputs):
                return generate_tokens(self.module, params, static, rows, prepend_queries=prepend_queries,
                                       layer_loop=layer_loop, loop_llm=loop_llm, **inputs)
            return jax.jit(run, static_argnames=("static", "prepend_queries"))

        def run_prefill(params, loop_llm, static, prepend_queries, **inputs):
            return prefill_tokens(self.module, params, static, prepend_queries=prepend_queries,
                                  layer_loop=layer_loop, loop_llm=loop_llm, **inputs)

        def run_decode(params, loop_llm, static, rows, prefilled):
            return decode_tokens(self.module, params, static, rows, prefilled, layer_loop, loop_llm)
        return _TwoPrograms(jax.jit(run_prefill, static_argnames=("static", "prepend_queries")),
                            jax.jit(run_decode, static_argnames="static",
                                    compiler_options=options))

    def generate(self, pixel_values, input_ids, attention_mask=None, qformer_input_ids=None,
                 qformer_attention_mask=None, sampler: SamplerConfig | None = None, seed=0,
                 **options) -> GenerateOutput:
        """Decode new tokens for a batch of images [B, H, W, C] or videos [B, T, H, W, C] + prompts
        (HF `generate` semantics).

        `sampler` (or keyword options such as max_new_tokens=, strategy="beam", num_beams=)
        controls decoding; knobs such as temperature, top_p, max_new_tokens take a scalar or one
        value per row, and new values reuse the compiled program (`jblip.sampling`). `seed`: an
        int s (row b samples with seed s + b) or one per row; a row's samples depend only on its
        own seed and settings. Returns token ids of the new tokens only, [B * num_return_sequences,
        largest max_new_tokens], pad after EOS or the row's own limit, with per-row lengths.
        """
        cfg = (sampler or self.default_sampler()).replace(**options) if options else (sampler or self.default_sampler())
        pixels = _as_nhwc(pixel_values, self.config.vision.num_channels)
        batch = pixels.shape[0]
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if ids.ndim != 2 or ids.shape[0] != batch or mask.shape != ids.shape:
            raise InputError(f"input_ids/attention_mask must both be [batch={batch}, length]; got {ids.shape}, {mask.shape}")
        check_token_ids(ids, self.config.text.vocab_size, "input_ids")
        static, rows = split(cfg, batch, seed)
        frames = num_frames(pixels)
        prepend = self.query_layout(ids, frames)
        ids, mask = pad_to_bucket(ids, mask, self.config, longest_output(cfg), cfg.pad_token_id, frames)
        q_ids, q_mask = self._qformer_inputs(batch, qformer_input_ids, qformer_attention_mask)
        inputs = self.shard_inputs(dict(pixel_values=pixels, input_ids=np.asarray(ids, np.int32),
                                        attention_mask=np.asarray(mask, np.int32), qformer_ids=q_ids,
                                        qformer_mask=q_mask))
        with self.sharding_context():
            out = self._generate_jit(self.params, self._decode_llm_params(), static, rows, prepend, **inputs)
        width = longest_output(cfg)  # the program's output is as wide as its bucketed cap
        return out if width == out.tokens.shape[1] else out._replace(tokens=out.tokens[:, :width])

    # ------------------------------------------------------------------ text in, text out
    def generate_text(self, images=None, prompts=None, *, videos=None, num_frames: int = 4, **options) -> list[str]:
        """Answers as text for images (paths, PIL images or uint8 arrays), or for `videos` (files,
        frame folders, GIFs, arrays; `num_frames` sampled from each), and one prompt per input (or
        one for all), with the checkpoint's own tokenizers; see `jblip.pipeline.answer`."""
        from jblip.pipeline import answer
        if prompts is None:
            raise ValueError("generate_text needs prompts= (one, or one per image / video)")
        return answer(self, images, prompts, videos=videos, num_frames=num_frames, **options)


class _TwoPrograms:
    """generate as a prefill program then a decode program, called like the one-program jit."""

    def __init__(self, prefill, decode):
        self.prefill, self.decode = prefill, decode

    def __call__(self, params, loop_llm, static, rows, prepend_queries, **inputs):
        check_rows(rows, inputs["input_ids"].shape[0])
        prefilled = self.prefill(params, loop_llm, static, prepend_queries, **inputs)
        return self.decode(params, loop_llm, static, rows, prefilled)

    def _cache_size(self) -> int:
        """Compiled generate programs, counted as pairs (the two compile for the same keys)."""
        return self.decode._cache_size()


def bucket_length(n: int, minimum: int = 16) -> int:
    """Prompt lengths are padded to these buckets so new lengths rarely recompile."""
    return bucket(n, minimum)


def pad_to_bucket(ids, mask, config: ModelConfig, max_new_tokens: int, pad_token_id: int, frames: int = 1):
    """Left-pad decoder-only prompts (right-pad T5 encoder inputs) to the bucket length, after
    checking that prompt + `max_new_tokens` (the longest row's) fit the LM's positions."""
    n = ids.shape[1]
    family = families.family(config)
    limit = getattr(config.text, "max_position_embeddings", None)
    if limit is not None and family.prompt_uses_positions:
        used = n + (config.num_query_tokens * frames if config.image_token_index is None or
                    not np.any(ids == config.image_token_index) else 0)
        if used + max_new_tokens > limit:
            raise InputError(f"prompt of {used} positions + max_new_tokens={max_new_tokens} exceeds the "
                             f"language model's {limit} positions; shorten the prompt or max_new_tokens")
    extra = bucket_length(n) - n
    if extra == 0:
        return ids, mask
    vocab = config.text.vocab_size
    pad_id = pad_token_id if 0 <= pad_token_id < vocab else 0  # masked anyway; must be a valid row
    side = ((0, 0), (0, extra)) if family.prompt_padding_side == "right" else ((0, 0), (extra, 0))
    return np.pad(ids, side, constant_values=pad_id), np.pad(mask, side, constant_values=0)


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_id(path_or_id) -> bool:
    """True only for an `owner/name` string that names nothing on this machine: no file, folder or
    link (even a broken one or a loop) at that path, nor a folder called `owner`. So a local
    path is never sent to the HF hub, where it would fail slowly with a misleading message."""
    if not isinstance(path_or_id, str) or not _HUB_ID.fullmatch(path_or_id) or path_or_id.endswith((".", "-")):
        return False
    owner = path_or_id.split("/", 1)[0]
    return not os.path.lexists(path_or_id) and not os.path.lexists(owner)


def _local_problem(path: str) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return f"{path} is a broken symbolic link or a symlink loop"
    return f"no checkpoint at {path!r}"


def resolve_path(path_or_id: str) -> str:
    """A local checkpoint path as it is, or a hub id (`owner/name` naming nothing local) fetched."""
    if os.path.exists(path_or_id):
        return os.fspath(path_or_id)
    if is_hub_id(path_or_id):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise FileNotFoundError(f"{path_or_id!r} is not a local path; to fetch it from the HF hub install "
                                    "huggingface_hub (pip install 'jblip[hub]')") from None
        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    raise FileNotFoundError(_local_problem(os.fspath(path_or_id)))


def load_pretrained(path_or_id: str, precision: Precision | str = "float32",
                    progress: Callable[[int, int, str], None] | None = None,
                    mesh=None, rules=None, quantize: str | None = None,
                    quantize_towers: tuple[str, ...] = ("llm",), group_size: int = 128,
                    layer_loop: str | None = None) -> VisionLanguageModel:
    """Load a HF-format InstructBLIP / BLIP-2 checkpoint directory (or hub id).

    With a `mesh` (`jblip.sharding.make_mesh`), each tensor goes straight from the
    file into its sharded array as it is read (one host tensor alive at a time;
    every process keeps only the slices its devices hold); the LM vocabulary is
    zero-padded to divide its mesh axes (`sharding.pad_vocab`). `rules` defaults
    to `sharding.LOGICAL_RULES`. A checkpoint holding NaN/inf weights loads with a
    `NonFiniteWeightsWarning`.

    `quantize="int8"` or `"int4"`: weight-only quantisation of the dense kernels of the
    `quantize_towers` ("llm", "vision"), applied as each tensor is read, so the float model
    is never held whole (`jblip.quantization`; int4 in groups of `group_size` along the
    contracted axis). Activations stay in the precision's compute dtype.

    `layer_loop` ("scan" or "unrolled", `jblip.scan.LAYER_LOOPS`): how the decode loop walks
    the LLM's layers; default: "unrolled" on CPU (a faster step, a longer first compile),
    "scan" elsewhere.
    """
    from jblip.convert.load import load_params
    from jblip.quantization import Quantization

    path = resolve_path(path_or_id)
    quantization = Quantization.parse(quantize, group_size, quantize_towers)
    config, params = load_params(path, precision, mesh, rules, progress=progress, quantization=quantization)
    return VisionLanguageModel(config, params, path, mesh=mesh, rules=rules, layer_loop=layer_loop)


