"""One process of the multi-process test (tests/test_multihost.py); not a test module itself.

usage: python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT CHECKPOINT MESH_SPEC OUT.npz
Joins the others over 127.0.0.1, loads the checkpoint onto one mesh spanning every
process, runs the forward and writes the gathered logits plus what this process holds.
"""
import sys

import jax
import numpy as np


def inputs(batch: int = 4, seed: int = 0) -> dict:
    """The same batch in every process (and in the single-process reference): tiny InstructBLIP-Vicuna
    shapes, 6 image placeholders (id 130) then a left-padded prompt."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.full((batch, 6), 130), rng.integers(3, 120, (batch, 7))], axis=1)
    mask = np.ones_like(ids)
    mask[1, 6:9] = 0
    ids[1, 6:9] = 0
    return dict(pixel_values=rng.standard_normal((batch, 28, 28, 3)).astype(np.float32), input_ids=ids,
                attention_mask=mask, qformer_input_ids=rng.integers(3, 99, (batch, 5)),
                qformer_attention_mask=np.ones((batch, 5), np.int64))


def join(process_id: int, num_processes: int, port: int):
    """Join the other processes over 127.0.0.1 (CPU collectives through gloo)."""
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)


def main(process_id: int, num_processes: int, port: int, checkpoint: str, spec: str, out: str):
    join(process_id, num_processes, port)
    from jax.experimental import multihost_utils

    import jblip
    from jblip import sharding

    mesh = sharding.make_mesh(spec)
    model = jblip.load_pretrained(checkpoint, mesh=mesh)
    logits = model.forward(**inputs())
    gathered = multihost_utils.process_allgather(logits, tiled=True)
    q = model.params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]  # stacked [L, D, N, H]
    np.savez(out, logits=np.asarray(gathered), global_devices=jax.device_count(),
             local_devices=jax.local_device_count(), q_spec=str(q.sharding.spec),
             q_local_shards=len(q.addressable_shards), q_shard_shape=q.addressable_shards[0].data.shape[1:],
             q_layers=q.addressable_shards[0].data.shape[0],
             q_rows=sorted({r for s in q.addressable_shards for r in range(72)[s.index[1]]}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, n, port, checkpoint, spec, out = sys.argv[1:]
    main(int(pid), int(n), int(port), checkpoint, spec, out)
