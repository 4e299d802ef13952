"""A decode worker that dies holding a lease: pulls one slow request, prints
``pulling`` once layer 0 is in place, then sleeps until the test SIGKILLs it.

    python decode_child.py ENDPOINT LAYOUT_JSON MODEL
"""

import json
import sys
import time

from kvtransfer.kv import KVLayout
from control_support import decode_side, payload

endpoint, layout_json, model = sys.argv[1:4]
layout = KVLayout(**json.loads(layout_json))
with decode_side(layout) as d, d.client(endpoint, model=model) as c:
    pull = c.pull("held-by-a-dying-reader", d.pool.alloc(4), payload=payload(60, 1, layer_delay=0.5))
    pull.wait_layer(0, timeout=30)
    print("pulling", flush=True)
    time.sleep(60)  # the test kills us long before this ends
