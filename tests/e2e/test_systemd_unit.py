"""The systemd unit, rendered as `make install-service` renders it, passes systemd-analyze verify."""

from __future__ import annotations

import subprocess

from support.harness import REPO, need_program


def test_unit_verifies(tmp_path):
    analyze = need_program("systemd-analyze")
    policy = REPO / "policy" / "examples" / "demo.toml"
    subprocess.run(
        ["make", "-s", "install-service", f"UNIT_DIR={tmp_path}", f"POLICY={policy}"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    unit = tmp_path / "graft-broker.service"
    text = unit.read_text()
    assert "@" not in text and "Type=notify" in text
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
