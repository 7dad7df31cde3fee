"""One process of the multi-process `jblip eval` test (tests/test_eval_multihost.py); not a test
module itself.

usage: python -m tests.multihost_eval_worker PROCESS_ID NUM_PROCESSES PORT EVAL_ARGS...
Joins the others over 127.0.0.1, then runs `jblip eval EVAL_ARGS...` as every process of a
multi-host run does.
"""
import sys

import jax

from tests.multihost_worker import join

if __name__ == "__main__":
    pid, n, port = (int(x) for x in sys.argv[1:4])
    join(pid, n, port)
    from jblip.cli import main
    code = main(["eval", *sys.argv[4:]])
    jax.distributed.shutdown()
    sys.exit(code)
