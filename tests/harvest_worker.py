"""Run by tests/test_harvest.py under torchrun: ``python -m tlshim harvest`` with its arguments, where the rank
named by HARVEST_KILL_RANK sends itself SIGKILL at its HARVEST_KILL_AFTER-th forward (a crash mid-run)."""

import os
import signal
import sys

from tlshim import harvest_cli

_load = harvest_cli._load


def load_then_arm(*args):
    model = _load(*args)
    if os.environ.get("RANK") == os.environ.get("HARVEST_KILL_RANK"):
        calls = [0]

        def count(module, inputs):
            calls[0] += 1
            if calls[0] == int(os.environ["HARVEST_KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)

        model.register_forward_pre_hook(count)
    return model


if __name__ == "__main__":
    harvest_cli._load = load_then_arm
    sys.exit(harvest_cli.main(sys.argv[1:]))
