"""The shipped Prometheus rules (deploy/prometheus/) with Debian's real promtool 2.42.

``promtool check rules`` validates every expression and template; ``promtool test rules``
runs deploy/prometheus/paddle-meter-rules.test.yml, where every alert has a series that
fires it (with its exact summary and description) and one that does not. A rule edited so
that it no longer fires as documented fails here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool missing: `make test` installs Debian's prometheus"
    return subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True,
                          timeout=300)


def test_rules_are_valid():
    done = _promtool("check", "rules", "paddle-meter-rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 13 rules found" in done.stdout


def test_every_alert_fires_when_it_should_and_only_then():
    done = _promtool("test", "rules", "paddle-meter-rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set((DEPLOY / "paddle-meter-rules.test.yml").read_text().split())
    rules = (DEPLOY / "paddle-meter-rules.yml").read_text().split()
    alerts = {rules[i + 1] for i, word in enumerate(rules) if word == "alert:"}
    assert len(alerts) == 9 and alerts <= tested  # each alert has its own cases


def test_an_alert_that_no_longer_fires_fails_its_test(tmp_path):
    for name in ("paddle-meter-rules.yml", "paddle-meter-rules.test.yml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    rules = tmp_path / "paddle-meter-rules.yml"
    rules.write_text(rules.read_text().replace(
        "increase(paddle_meter_truncated_inputs_total[10m])) > 50",
        "increase(paddle_meter_truncated_inputs_total[10m])) > 500"))
    assert PROMTOOL is not None, "promtool missing: `make test` installs Debian's prometheus"
    done = subprocess.run([PROMTOOL, "test", "rules", "paddle-meter-rules.test.yml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "PaddleMeterOverlongInputFlood" in done.stdout + done.stderr
