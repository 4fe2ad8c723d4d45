"""Try each connect (HOST:PORT) or bind (bind:PORT) in argv; print one errno name per line.

The process is the unit the fallback's once-per-process message is counted in.
"""

import errno
import socket
import sys

for target in sys.argv[1:]:
    kind, _, rest = target.partition(":")
    s = socket.socket()
    try:
        if kind == "bind":
            s.bind(("0.0.0.0", int(rest)))
            s.listen()
        else:
            s.connect((kind, int(rest)))
        print("OK", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno), flush=True)
    finally:
        s.close()
