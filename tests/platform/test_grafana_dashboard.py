"""The shipped Grafana dashboard is valid JSON, its panels query only series the app exports
(``kvray.metrics``), and it shows what docs/metrics.md promises."""
import json
import re
from pathlib import Path

from kvray.metrics import SERIES, exported_names

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster-configs" / "grafana" / "kvray-dashboard.json"
PROMQL_WORDS = {"sum", "by", "rate", "max", "histogram_quantile", "le", "without", "avg", "min", "increase"}


def series_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside {...} label matchers and "...",
    other than PromQL's own words, label names and Grafana variables."""
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\$\w+", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"by \([^)]*\)", "", bare)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if w not in PROMQL_WORDS}


def test_series_in_parses_promql():
    e = 'histogram_quantile(0.99, sum by (le, slo_class) (rate(ray_kvray_x_bucket{model=~"$model"}[$__rate_interval])))'
    assert series_in(e) == {"ray_kvray_x_bucket"}
    assert series_in('sum(rate(a_total{s="1"}[1m])) / sum(rate(b_total[1m]))') == {"a_total", "b_total"}


def test_dashboard_queries_only_exported_series():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["panels"]
    known = exported_names()
    used = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = series_in(t["expr"])
            assert names, t["expr"]
            assert names <= known, (p["title"], names - known)
            used |= names
    for q in [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]:
        assert series_in(q.replace("label_values(", "(").split(",")[0]) <= known, q
    # every kvray series has a panel
    covered = {n.removeprefix("ray_").removesuffix("_bucket") for n in used}
    assert set(SERIES) <= covered, set(SERIES) - covered
