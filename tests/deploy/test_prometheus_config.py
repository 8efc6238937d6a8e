"""Prometheus config and alert rules, checked and unit-tested by the real promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.deploy.promql import EXPORTED, metric_names
from tests.helpers.env import REPO, require_binary

PROM = REPO / "deploy" / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yaml"))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [require_binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60, cwd=PROM
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def alerts() -> dict[str, str]:
    return {
        rule["alert"]: rule["expr"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_compose_prometheus_config_is_valid() -> None:
    out = promtool("check", "config", PROM / "prometheus.yml")
    assert "1 rule files found" in out.stdout


def test_rules_are_valid() -> None:
    assert RULES
    promtool("check", "rules", *RULES)


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    out = promtool("test", "rules", *RULE_TESTS)
    assert "SUCCESS" in out.stdout


def test_every_alert_is_unit_tested_firing() -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert set(alerts()) == fired


def test_alerts_read_only_exported_metrics() -> None:
    for name, expr in alerts().items():
        names = metric_names(expr)
        assert names, name
        assert names <= EXPORTED, (name, names - EXPORTED)
