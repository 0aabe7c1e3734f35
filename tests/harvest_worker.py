"""Run by tests/test_harvest.py under torchrun: ``python -m tlshim harvest`` with its arguments.

HARVEST_KILL_RANK / HARVEST_KILL_AFTER: that rank sends itself SIGKILL at its n-th forward (a crash
mid-run). HARVEST_THEN_REFUSE: the process group is made here (harvest then uses it, and leaves it),
and after the harvest a second one with other arguments into the same folder must be refused on
every rank; each rank prints what it was told.
"""

import os
import signal
import sys

from tlshim import HarvestError, harvest_cli

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


def main(argv):
    if not os.environ.get("HARVEST_THEN_REFUSE"):
        return harvest_cli.main(argv)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    code = harvest_cli.main(argv)
    try:
        harvest_cli.main([*argv, "--max-contexts", "40"])
    except HarvestError as exc:
        print(f"rank {dist.get_rank()} refused: {exc}", flush=True)
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    harvest_cli._load = load_then_arm
    sys.exit(main(sys.argv[1:]))
