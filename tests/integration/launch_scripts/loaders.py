"""Starts DataLoader workers, writes their pids to $OUT_DIR/tree.<RANK>, then waits to be stopped."""
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset


class Slow(Dataset):
    def __len__(self):
        return 10 ** 6

    def __getitem__(self, i):
        time.sleep(0.05)
        return torch.tensor([os.getpid()])


if __name__ == "__main__":
    it = iter(DataLoader(Slow(), num_workers=2, batch_size=1, persistent_workers=True))
    pids = {int(next(it)[0]) for _ in range(8)}
    rank = os.environ["RANK"]
    tmp = os.path.join(os.environ["OUT_DIR"], f"tree.{rank}.tmp")
    with open(tmp, "w") as f:
        f.write(" ".join(str(p) for p in [os.getpid(), *sorted(pids)]))
    os.replace(tmp, os.path.join(os.environ["OUT_DIR"], f"tree.{rank}"))
    while True:
        time.sleep(1)
