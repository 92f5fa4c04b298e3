"""Print every tick of the pipeline's ring: `python examples/print_ticks.py [RING] [SECONDS]`."""

import sys
import time

from pipeline import RingReader

ring = RingReader.attach(sys.argv[1] if len(sys.argv) > 1 else "pipeline.ticks", "print_ticks")
end = time.monotonic() + (float(sys.argv[2]) if len(sys.argv) > 2 else float("inf"))
while time.monotonic() < end:
    for t in ring.poll_blocking(timeout_s=0.5):
        print(ring.symbols[t["symbol"]], t["kind"], t["trade_id"], t["price"], t["qty"], flush=True)
ring.close()
