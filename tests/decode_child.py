"""A decode worker that dies holding a lease: pulls one slow request, prints one JSON
line, ``{"event": "pulling", "pid": N}``, once layer 0 is in place (read with
:func:`kvtransfer.testing.children.start_child`), then sleeps until the test SIGKILLs it.

    python decode_child.py ENDPOINT LAYOUT_JSON MODEL
"""

import json
import os
import sys
import time

from kvtransfer.kv import KVLayout
from control_support import decode_side, payload

endpoint, layout_json, model = sys.argv[1:4]
layout = KVLayout(**json.loads(layout_json))
with decode_side(layout) as d, d.client(endpoint, model=model) as c:
    pull = c.pull("held-by-a-dying-reader", d.pool.alloc(4), payload=payload(60, 1, layer_delay=0.5))
    pull.wait_layer(0, timeout=30)
    print(json.dumps({"event": "pulling", "pid": os.getpid()}), flush=True)
    time.sleep(60)  # the test kills us long before this ends
