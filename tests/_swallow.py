"""A pool target that swallows the soft timeout and returns a success score (tests/test_rewards_math.py)."""
import time


def swallow(seconds: float) -> float:
    try:
        time.sleep(seconds)
    except BaseException:  # noqa: BLE001 - the point: a target that hides the interruption
        return 1.0
    return 0.5
