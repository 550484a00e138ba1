"""Run an application and kill its process at a chosen point (the resume tests' fault injection).

    python tests/kill_after.py train 3 ARGS...     # SIGKILL right after step 3 (and its checkpoint)
    python tests/kill_after.py extract 1 ARGS...   # os._exit(3) right after the 1st shard is written

The applications take an ``on_step`` / ``on_shard_written`` callback; production code holds no hook.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    app, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if app == "train":
        from llm2clip.apps.train import main as train_main

        def on_step(step: int) -> None:
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)

        train_main(argv, on_step=on_step)
    elif app == "extract":
        from llm2clip.apps.extract import extract, parse_config

        def on_shard_written(n: int) -> None:
            if n >= at:
                sys.stdout.flush()
                os._exit(3)

        extract(parse_config(argv), on_shard_written=on_shard_written)
    else:
        raise SystemExit(f"unknown application {app!r}")


if __name__ == "__main__":
    main()
