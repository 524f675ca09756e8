"""A pool target with a slow first use, like math-verify's import and first parse (tests/test_rewards_math.py):
worker_init pays it before the worker reports ready; without that, the first item pays it under its timeout."""

import time

_warm = [False]


def _warm_up() -> None:
    if not _warm[0]:
        time.sleep(1.0)
        _warm[0] = True


def worker_init() -> None:
    _warm_up()


def one(_: object) -> float:
    _warm_up()
    return 1.0
