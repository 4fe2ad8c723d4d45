"""Build and install graft: the Python packages and the libgraft.so shim.

The source tree keeps one top-level directory per component (shim/, broker/,
policy/, graft/ for the CLI); they install as one ``graft`` package namespace
so nothing generic like ``policy`` lands at the top of site-packages.
``build_py`` compiles libgraft.so (and libgraft-musl.so, where musl-gcc is) with the shim's own Makefile and ships it,
with the wire header the broker parses, inside ``graft.shim``; and the
seccomp agent's C loop, libgraft_seccomp.so (broker/seccomp/Makefile), with
its header, inside ``graft.broker.seccomp``; and the fast path's per-socket
work, libgraft_confine.so (broker/confine/Makefile), inside ``graft.broker.confine``.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BROKER_LAYERS = ("core", "shim", "seccomp", "dns", "confine", "io")  # broker/__init__.py


class BuildWithShim(build_py):
    def run(self):
        # The musl build (for musl images) needs musl-gcc; without it graft-runtime refuses musl images in preload mode.
        shims = ["libgraft.so", *(["libgraft-musl.so"] if shutil.which("musl-gcc") else [])]
        subprocess.run(["make", "-C", os.path.join(HERE, "shim"), *shims], check=True)
        subprocess.run(["make", "-C", os.path.join(HERE, "broker", "seccomp"), "libgraft_seccomp.so"], check=True)
        subprocess.run(["make", "-C", os.path.join(HERE, "broker", "confine"), "libgraft_confine.so"], check=True)
        super().run()


setup(
    name="graft",
    version="0.1.0",
    description="Graft container sockets onto the host network stack, under policy",
    python_requires=">=3.11",
    packages=["graft", "graft.broker", *(f"graft.broker.{p}" for p in BROKER_LAYERS), "graft.policy", "graft.shim"],
    package_dir={
        "graft": "graft",
        "graft.broker": "broker",
        **{f"graft.broker.{p}": f"broker/{p}" for p in BROKER_LAYERS},
        "graft.policy": "policy",
        "graft.shim": "shim",
    },
    package_data={
        "graft.shim": ["libgraft.so", "libgraft-musl.so", "graft_wire.h"],
        "graft.broker.seccomp": ["libgraft_seccomp.so", "seccomp_fast.h"],
        "graft.broker.confine": ["libgraft_confine.so", "graft_confine.h", "graft_maps.h"],
        "graft.policy": ["examples/*.toml", "examples/README.md"],
    },
    install_requires=[
        "cffi>=1.16",
        "trio>=0.25",
        "pyroute2>=0.9",
        "pydantic>=2.6",
        "dnspython>=2.6",  # the resolver's DNS messages (broker/dns/message.py)
    ],
    extras_require={
        "test": ["pytest", "pytest-trio", "hypothesis", "kubernetes-validate"],  # packaging/kubernetes schemas
        "lint": ["ruff"],  # make lint
        # make bench: figures (Agg backend) and the broker profile (docs/benchmarks.md)
        "bench": ["matplotlib", "py-spy"],
    },
    entry_points={
        "console_scripts": [
            "graft = graft.cli:main",
            "graft-broker = graft.broker.main:main",
            "graft-runtime = graft.runtime:main",
        ]
    },
    cmdclass={"build_py": BuildWithShim},
    zip_safe=False,
)
