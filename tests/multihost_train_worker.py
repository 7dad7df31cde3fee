"""One process of the multi-process training test (tests/test_multihost.py); not a test module.

usage: python -m tests.multihost_train_worker PROCESS_ID NUM_PROCESSES PORT CONFIG.json
Joins the others over 127.0.0.1 and runs `train.loop.train` on the config (a mesh spanning every
process; each process reads only its share of every global batch). Process 0 writes the log.
"""
import json
import sys

import jax

from tests.multihost_worker import join


def main(process_id: int, num_processes: int, port: int, config_path: str):
    join(process_id, num_processes, port)
    from jblip.train.config import TrainConfig
    from jblip.train.loop import train

    with open(config_path) as f:
        train(TrainConfig.from_dict(json.load(f)))
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, n, port, config_path = sys.argv[1:]
    main(int(pid), int(n), int(port), config_path)
