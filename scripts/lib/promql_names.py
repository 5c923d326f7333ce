"""The metric names a Grafana dashboard and Prometheus rule files use, for scripts/check-deploy.

  promql_names.py rules-file DASHBOARD.json
      prints a Prometheus rule file with one recording rule per dashboard query (Grafana's
      variables filled in), so `promtool check rules` checks every query's syntax
  promql_names.py check METRICS.txt DASHBOARD.json RULES.yml...
      fails, naming each, if a metric the dashboard or the rules use is not on METRICS.txt
      (a /metrics page); prints what it checked

Python's standard library only: the rule files' `expr:` values are read line by line (plain,
quoted or block scalars), which is all our rule files use.
"""

import json
import re
import sys

# Series Prometheus makes itself: never on an application's /metrics.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "atan2", "inf", "nan"}

NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"


def metric_names(expr):
    """The metric names a PromQL expression selects (function and label names left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    e = re.sub(r"\$\{?\w+\}?", "1", e)  # any Grafana variable left
    names = set()
    for m in re.finditer(rf"(?<![\w.$]){NAME}", e):
        name = m.group(0)
        after = e[m.end():].lstrip()
        if after.startswith("(") or name.lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(name)
    return names


def fill_grafana_variables(expr):
    """A Grafana query as Prometheus would receive it (intervals 5m, selections match all)."""
    e = re.sub(r"\$\{?__(?:rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", e)


def dashboard_queries(path):
    """Every query of a dashboard: the panels' targets and the query variables'."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    queries = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                queries.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc.get("panels", []))
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        if m:
            queries.append(m.group(1))
        elif m := re.fullmatch(r"\s*query_result\((.*)\)\s*", query):
            queries.append(m.group(1))
    return queries


def rule_exprs(path):
    """The `expr:` values of a Prometheus rule file."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    exprs, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*(?:-\s+)?)expr:\s*(.*?)\s*$", lines[i])
        i += 1
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2)
        if value[:1] in ("|", ">"):
            block = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            exprs.append(" ".join(block).strip())
        elif value.startswith('"'):
            exprs.append(json.loads(value))
        elif value.startswith("'"):
            exprs.append(value[1:-1].replace("''", "'"))
        else:
            exprs.append(re.sub(r"\s+#.*$", "", value))
    return exprs


def exposed(path):
    """The metric names on a /metrics page: every sample's, and each histogram's base name."""
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# TYPE "):
                names.add(line.split()[2])
            elif line.strip() and not line.startswith("#"):
                m = re.match(NAME, line)
                if m:
                    names.add(m.group(0))
    return names


def main(argv):
    if len(argv) == 3 and argv[1] == "rules-file":
        print("groups:\n  - name: check-deploy-dashboard-queries\n    rules:")
        for i, q in enumerate(dashboard_queries(argv[2])):
            print(f"      - record: check_deploy:query_{i}\n        expr: {json.dumps(fill_grafana_variables(q))}")
        return 0
    if len(argv) >= 4 and argv[1] == "check":
        have = exposed(argv[2])
        used = {}  # name -> the files that use it
        for path in argv[3:]:
            queries = dashboard_queries(path) if path.endswith(".json") else rule_exprs(path)
            if not queries:
                print(f"{path}: no queries found", file=sys.stderr)
                return 1
            for q in queries:
                for name in metric_names(q):
                    used.setdefault(name, set()).add(path)
        missing = sorted(n for n in used if n not in have and n not in PROMETHEUS_OWN)
        for name in missing:
            print(f"not on /metrics: {name} (used in {', '.join(sorted(used[name]))})", file=sys.stderr)
        checked = sorted(n for n in used if n not in PROMETHEUS_OWN)
        print(f"{len(checked)} metric names used, {len(checked) - len(missing)} on /metrics: {' '.join(checked)}")
        return 1 if missing else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
