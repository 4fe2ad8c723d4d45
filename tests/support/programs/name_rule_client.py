"""A program whose destination the policy names by name (e2e/test_names.py, rules' `names`).

usage: name_rule_client.py NAME PORT OTHER_PORT

It prints one JSON object. Before any lookup it connects to 127.0.0.1:PORT
by address ("before": 0 or the errno). Then it resolves NAME (through the
broker's resolver, as resolv.conf says), connects to each address it got
10 times in a row ("after": the errnos), and to 127.0.0.1:OTHER_PORT
("other"), a port the rule does not name. Last it connects again and again
until a connect is refused ("lapsed_after": seconds from the lookup's answer
to the first refusal), at most for 20 s, or "lapsed_after": null.
"""

from __future__ import annotations

import json
import socket
import sys
import time

LAPSE_LIMIT = 20.0


def connect(addr: str, port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        return s.connect_ex((addr, port))


def main() -> None:
    name, port, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = {"before": connect("127.0.0.1", port)}
    addresses = sorted({info[4][0] for info in socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)})
    answered = time.monotonic()
    out["addresses"] = addresses
    out["after"] = [connect(a, port) for a in addresses for _ in range(10)]
    out["other"] = connect("127.0.0.1", other)
    out["lapsed_after"] = None
    while time.monotonic() - answered < LAPSE_LIMIT:
        if connect(addresses[0], port) != 0:
            out["lapsed_after"] = round(time.monotonic() - answered, 3)
            break
        time.sleep(0.05)  # paces the polling; the lapse itself is what is measured
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
