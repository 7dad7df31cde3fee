"""`RetrievalEngine`: a BLIP-2 retrieval model with params, tokenizer, image processor and jitted,
batched entry points (`image_embeddings`, `text_embeddings`, `itc_scores`, `itm_scores`, `rerank`).

Inputs are cut into fixed-size chunks (the last one zero-padded) and texts padded to a multiple
of 8 tokens, so a folder of any size compiles once per text-length bucket. With a mesh, params
are placed per the logical rules and each chunk is split over the data-parallel axes.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jblip import sharding
from jblip.image_processing import ImageProcessor
from jblip.retrieval.config import RetrievalConfig
from jblip.retrieval.model import RetrievalModel, abstract_params, itc_similarity
from jblip.text_processing import QFORMER_SUBDIR, TextTokenizer

TEXT_BUCKET = 8


class RetrievalEngine:
    def __init__(self, config: RetrievalConfig, params, tokenizer: TextTokenizer | None = None,
                 image_processor: ImageProcessor | None = None, mesh=None, rules=None, path: str | None = None,
                 batch_size: int = 16, max_text_length: int = 32):
        self.config, self.path, self.mesh = config, path, mesh
        self.rules = tuple(sharding.LOGICAL_RULES if rules is None else rules)
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor(config.vision.image_size)
        self.batch_size, self.max_text_length = int(batch_size), int(max_text_length)
        self.module = RetrievalModel(config)
        self.param_shardings = None
        if mesh is not None:
            boxed = abstract_params(config, boxed=True)
            self.param_shardings = sharding.param_shardings(boxed, mesh, self.rules)
            params = jax.tree_util.tree_map(lambda x, s: jax.device_put(jnp.asarray(x), s), params,
                                            self.param_shardings)
        self.params = params
        self._jitted = {}

    @classmethod
    def from_pretrained(cls, path: str, precision="float32", mesh=None, **kw) -> "RetrievalEngine":
        """A HF-format retrieval checkpoint directory with its BERT tokenizer (in the folder itself or
        in `qformer_tokenizer/`)."""
        from jblip.convert.retrieval import load_retrieval_params
        config, params = load_retrieval_params(path, precision)
        tokdir = os.path.join(path, QFORMER_SUBDIR)
        tokenizer = TextTokenizer.from_dir(tokdir if os.path.isdir(tokdir) else path, "Q-Former tokenizer")
        return cls(config, params, tokenizer, ImageProcessor.from_pretrained(path, config.vision.image_size),
                   mesh=mesh, path=path, **kw)

    def __repr__(self):
        return f"RetrievalEngine({self.config.name!r}, queries={self.config.num_query_tokens}, dim={self.config.embed_dim})"

    # ------------------------------------------------------------------ inputs
    def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """[CLS] text [SEP] ids and masks, right-padded to a multiple of 8 (at most `max_text_length`)."""
        if isinstance(texts, str):
            texts = [texts]
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass token ids to the *_ids methods")
        rows = self.tokenizer.encode(list(texts))
        rows = [r[:self.max_text_length - 1] + r[-1:] if len(r) > self.max_text_length else r for r in rows]
        width = min(-(-max(map(len, rows)) // TEXT_BUCKET) * TEXT_BUCKET, self.max_text_length)
        pad = self.tokenizer.special_id("pad_token") or 0
        ids = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask

    def pixels(self, images) -> np.ndarray:
        """Paths, PIL images or uint8 arrays -> float32 NHWC; float NHWC arrays pass through."""
        if isinstance(images, np.ndarray) and images.dtype != np.uint8 and images.ndim == 4:
            return images.astype(np.float32)
        return self.image_processor(images)

    # ------------------------------------------------------------------ jitted chunks
    def _fn(self, name):
        if name not in self._jitted:
            method = {"image": RetrievalModel.image_embeddings, "text": RetrievalModel.text_embeddings,
                      "states": RetrievalModel.vision_states, "itm": RetrievalModel.itm_logits}[name]
            self._jitted[name] = jax.jit(lambda params, *args: self.module.apply({"params": params}, *args,
                                                                                method=method))
        return self._jitted[name]

    def _chunked(self, name, *arrays) -> np.ndarray:
        n, size, out = arrays[0].shape[0], self.batch_size, []
        for start in range(0, n, size):
            parts = [a[start:start + size] for a in arrays]
            real = parts[0].shape[0]
            parts = [np.concatenate([p, np.zeros((size - real,) + p.shape[1:], p.dtype)]) if real < size else p
                     for p in parts]
            if self.mesh is not None:
                spec = jax.sharding.NamedSharding(self.mesh, sharding.batch_spec(size, self.mesh, self.rules))
                parts = [jax.device_put(p, spec) for p in parts]
            with sharding.activation_rules(self.mesh, self.rules):
                result = self._fn(name)(self.params, *parts)
            out.append(np.asarray(jax.device_get(result))[:real])
        return np.concatenate(out)

    # ------------------------------------------------------------------ public API
    def image_embeddings(self, images) -> np.ndarray:
        """L2-normalised per-query embeddings [N, Q, E] (float32)."""
        return self._chunked("image", self.pixels(images))

    def text_embeddings(self, texts) -> np.ndarray:
        """L2-normalised [CLS] embeddings [N, E] (float32)."""
        return self.text_embeddings_ids(*self.tokenize(texts))

    def text_embeddings_ids(self, ids, mask) -> np.ndarray:
        return self._chunked("text", np.asarray(ids, np.int32), np.asarray(mask, np.int32))

    def itc_scores(self, images, texts) -> np.ndarray:
        """ITC similarity [I, T]: each pair's best query (no temperature, as LAVIS and HF report it)."""
        return np.asarray(itc_similarity(self.image_embeddings(images), self.text_embeddings(texts)))

    def vision_states(self, images) -> np.ndarray:
        return self._chunked("states", self.pixels(images))

    def itm_logits_pairs(self, states, ids, mask) -> np.ndarray:
        """ITM logits [N, 2] of row-aligned (image states, text) pairs."""
        return self._chunked("itm", np.asarray(states), np.asarray(ids, np.int32), np.asarray(mask, np.int32))

    def itm_scores(self, images, texts) -> np.ndarray:
        """Match probability softmax(ITM logits)[1] of every (image, text) pair [I, T]."""
        states = self.vision_states(images)
        ids, mask = self.tokenize(texts)
        i, t = len(states), len(ids)
        logits = self.itm_logits_pairs(np.repeat(states, t, axis=0), np.tile(ids, (i, 1)), np.tile(mask, (i, 1)))
        return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1)[:, 1]).reshape(i, t)

    def rerank(self, states, ids, mask, itc) -> np.ndarray:
        """LAVIS' `k_test` score of candidate pairs: ITM "match" logit + ITC similarity (row-aligned)."""
        return self.itm_logits_pairs(states, ids, mask)[:, 1] + np.asarray(itc)
