"""Rank 1 raises inside a @record main (its error file is written at once) and then takes 60 s to exit; rank 0,
once that error file exists, aborts (SIGABRT) straight away. So the supervisor sees rank 0 die first and stops
rank 1 itself, although rank 1 failed first: the order of a survivor's crash after its peer's error, made fixed."""
import atexit
import os
import time

from torch.distributed.elastic.multiprocessing.errors import record


def error_file_of(rank: int) -> str:
    mine = os.environ["TORCHELASTIC_ERROR_FILE"]  # <log dir>/attempt_<n>/<local rank>/error.json
    return os.path.join(os.path.dirname(os.path.dirname(mine)), str(rank), os.path.basename(mine))


@record
def main():
    if os.environ["RANK"] == "1":
        atexit.register(time.sleep, 60)  # slow to leave, as a rank tearing down a big job is
        raise ValueError("boom from a torchrun script")
    deadline = time.monotonic() + 60
    while not os.path.exists(error_file_of(1)) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.abort()


if __name__ == "__main__":
    main()
