"""Rank $FAIL_RANK raises inside a @record main: torch writes the error file the launcher reads."""
import os
import time

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main():
    if os.environ["RANK"] == os.environ.get("FAIL_RANK", "1"):
        raise ValueError("boom from a torchrun script")
    time.sleep(60)  # the others are stopped by the launcher


if __name__ == "__main__":
    main()
