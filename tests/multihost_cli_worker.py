"""One process of the multi-process `jblip eval` / `jblip caption` tests (tests/test_eval_multihost.py,
tests/test_caption_multihost.py); not a test module itself.

usage: python -m tests.multihost_cli_worker PROCESS_ID NUM_PROCESSES PORT COMMAND ARGS...
Joins the others over 127.0.0.1, then runs `jblip COMMAND ARGS...` as every process of a
multi-host run does.
"""
import sys

import jax

from tests.multihost_worker import join

if __name__ == "__main__":
    pid, n, port = (int(x) for x in sys.argv[1:4])
    join(pid, n, port)
    from jblip.cli import main
    code = main(sys.argv[4:])
    jax.distributed.shutdown()
    sys.exit(code)
