"""Ignores SIGTERM (a script that never stops politely) and says so in $OUT_DIR/ready.<RANK>."""
import os
import signal
import time

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(os.environ["OUT_DIR"], f"ready.{os.environ['RANK']}"), "w").close()
    while True:
        time.sleep(1)
