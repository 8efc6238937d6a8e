"""The Grafana dashboard and provisioning: generated file in sync, every expression parses and reads only
exported metrics, every exported metric family is shown. (test_observability.py runs them on real data.)"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from deploy.grafana import dashboard
from tests.deploy.promql import COUNTERS, EXPORTED, GAUGES, HISTOGRAMS, metric_names
from tests.helpers.env import REPO

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "qwen3vl.json"


def panel_exprs(rate_interval: str = "1m") -> list[tuple[str, str]]:
    """(panel title, expression) with Grafana's interval variable replaced by ``rate_interval``."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (p["title"], t["expr"].replace("$__rate_interval", rate_interval))
        for p in panels
        if p["type"] != "row"
        for t in p["targets"]
    ]


def test_dashboard_json_matches_its_generator() -> None:
    assert DASHBOARD.read_text() == dashboard.render(), "run: python -m deploy.grafana.dashboard > " + str(
        DASHBOARD.relative_to(REPO)
    )


def test_every_panel_expression_parses_and_reads_exported_metrics() -> None:
    exprs = panel_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        names = metric_names(expr)  # raises on a syntax error
        assert names, (title, expr)
        assert names <= EXPORTED, (title, names - EXPORTED)


def test_every_exported_metric_is_on_the_dashboard() -> None:
    shown = set().union(*(metric_names(e) for _, e in panel_exprs()))
    families = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in shown}
    assert (COUNTERS | GAUGES | HISTOGRAMS) - families == set()


def test_layout_and_datasource() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert board["templating"]["list"][0]["query"] == "prometheus"


def test_provisioning_points_at_the_dashboards() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "qwen3vl.yml").read_text())
    path = Path(providers["providers"][0]["options"]["path"])
    compose = yaml.safe_load((REPO / "deploy" / "docker" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{path}:ro" in mounts
