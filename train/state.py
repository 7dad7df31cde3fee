"""Training state (trainable params, optimizer state, step) and where it lives on a mesh.

Frozen params are not part of the state: they come from the base checkpoint,
are never updated and are passed to the step as a separate argument.
Trainable params are float32 master copies whatever the compute dtype.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jblip import sharding
from jblip.config import ModelConfig
from jblip.model import abstract_params
from jblip.train import trainable as tr
from jblip.train.optim import state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # micro-batches consumed (int32 scalar)
    params: Any          # trainable subtree, float32
    opt_state: Any


def init_state(trainable_params, tx: optax.GradientTransformation) -> TrainState:
    params = tr.cast(trainable_params, jnp.float32)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


# Compute dtype per top-level group: frozen params are stored in it (bf16 towers: half the memory;
# the modules cast weights to the compute dtype before every matmul anyway).
TOWER_DTYPE = {"vision": lambda p: p.vision, "qformer": lambda p: p.qformer,
               "projection": lambda p: p.qformer, "llm": lambda p: p.text}


class Placement:
    """Shardings of the state, the frozen params and the batch on one mesh (None: no mesh)."""

    def __init__(self, config: ModelConfig, trainable_set, tx: optax.GradientTransformation,
                 mesh=None, rules=None):
        self.mesh = mesh
        self.rules = tuple(sharding.LOGICAL_RULES if rules is None else rules)
        self.tx = tx
        if mesh is None:
            self.state = self.frozen = self.replicated = None
            return
        full = sharding.param_shardings(abstract_params(config, boxed=True), mesh, self.rules)
        trainable, self.frozen = tr.split(full, trainable_set)
        self.replicated = NamedSharding(mesh, P())
        abstract_trainable = jax.eval_shape(lambda p: tr.cast(p, jnp.float32),
                                            tr.split(abstract_params(config), trainable_set)[0])
        abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
        self.state = TrainState(self.replicated, trainable,
                                state_shardings(tx, abstract_opt, trainable, self.replicated))

    def batch(self, batch_size: int):
        """Sharding of arrays with the batch on axis 0 (split where it divides the data axes)."""
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, sharding.batch_spec(batch_size, self.mesh, self.rules))

    def put_state(self, state: TrainState) -> TrainState:
        return state if self.mesh is None else jax.device_put(state, self.state)

    def put_frozen(self, frozen):
        return frozen if self.mesh is None else jax.device_put(frozen, self.frozen)

    def abstract_state(self, trainable_params) -> TrainState:
        """ShapeDtypeStructs (with target shardings) of a state built from these params: restore targets."""
        shapes = jax.eval_shape(lambda p: init_state(p, self.tx), trainable_params)
        if self.mesh is None:
            return shapes
        return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      shapes, self.state)
