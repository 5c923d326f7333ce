"""The chaos run's timeline as one SVG: purchase answers per second by kind (top), units left
per product (bottom), faults as bands across both, one colour per kind."""

from collections import defaultdict
from html import escape

W, H, LEFT, RIGHT, TOP = 1100, 560, 60, 170, 30
PANEL = 220
COLOURS = {
    "serve-kill": "#e15759",
    "worker-kill": "#f28e2b",
    "pause": "#edc948",
    "redis-kill": "#b07aa1",
    "redis-failover": "#9c27b0",
    "promoted": "#4a148c",
    "rollback": "#76b7b2",
    "rabbitmq-stop": "#59a14f",
    "postgres-stop": "#4e79a7",
    "blackhole": "#9c755f",
    "exited": "#000000",
}
ANSWERS = (("202", "#2e7d32"), ("409", "#1565c0"), ("410", "#6d4c41"), ("503", "#c62828"), ("other", "#9e9e9e"))


def _answer(h):
    s = h.get("s")
    if s in (202, 409, 410, 503):
        return str(s)
    return "other"


def timeline(run, path):
    history = [h for h in run["history"] if h["op"] == "reserve" and not h.get("final")]
    faults = run.get("faults", [])
    samples = [s for s in run.get("samples", []) if s.get("kind") == "remaining"]
    end = max([h["t"] for h in history] + [f["t1"] for f in faults] + [s["t"] for s in samples] + [1])
    width = W - LEFT - RIGHT

    def x(t):
        return LEFT + width * t / end

    per_sec = defaultdict(lambda: defaultdict(int))
    for h in history:
        per_sec[int(h["t"])][_answer(h)] += 1
    peak = max([sum(v.values()) for v in per_sec.values()] + [1])
    stock_peak = max([n for s in samples for n in s["remaining"].values() if n is not None] + [1])

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">']
    out.append(f'<rect width="{W}" height="{H}" fill="white"/>')
    top1, top2 = TOP, TOP + PANEL + 40
    for f in faults:
        colour = COLOURS.get(f["kind"], "#999")
        x0, x1 = x(f["t0"]), max(x(f["t1"]), x(f["t0"]) + 2)
        out.append(f'<rect x="{x0:.1f}" y="{top1}" width="{x1 - x0:.1f}" height="{top2 + PANEL - top1}" fill="{colour}" opacity="0.25"><title>{escape(f["kind"])} {escape(str(f["target"]))}</title></rect>')
    # Answers per second, stacked.
    for sec in sorted(per_sec):
        y = top1 + PANEL
        for name, colour in ANSWERS:
            n = per_sec[sec].get(name, 0)
            if n:
                h = PANEL * n / peak
                y -= h
                out.append(f'<rect x="{x(sec):.1f}" y="{y:.1f}" width="{max(width / end, 1):.1f}" height="{h:.1f}" fill="{colour}"/>')
    out.append(f'<text x="{LEFT}" y="{top1 - 8}">purchase answers per second (peak {peak})</text>')
    # Units left per product.
    series = defaultdict(list)
    for s in samples:
        for p, n in s["remaining"].items():
            if n is not None:
                series[p].append((s["t"], n))
    for i, (p, pts) in enumerate(sorted(series.items())):
        hue = (i * 47) % 360
        d = " ".join(f"{x(t):.1f},{top2 + PANEL - PANEL * n / stock_peak:.1f}" for t, n in pts)
        out.append(f'<polyline points="{d}" fill="none" stroke="hsl({hue},60%,40%)" stroke-width="1"><title>product {escape(p)}</title></polyline>')
    out.append(f'<text x="{LEFT}" y="{top2 - 8}">units left per product (Redis; peak {stock_peak})</text>')
    for top in (top1, top2):
        out.append(f'<line x1="{LEFT}" y1="{top + PANEL}" x2="{LEFT + width}" y2="{top + PANEL}" stroke="black"/>')
    for t in range(0, int(end) + 1, max(1, int(end / 10) // 10 * 10 or 10)):
        out.append(f'<text x="{x(t):.1f}" y="{top2 + PANEL + 14}" text-anchor="middle">{t}s</text>')
    # Legend.
    ly = TOP
    for name, colour in ANSWERS:
        out.append(f'<rect x="{W - RIGHT + 10}" y="{ly}" width="10" height="10" fill="{colour}"/><text x="{W - RIGHT + 25}" y="{ly + 9}">{name}</text>')
        ly += 15
    ly += 10
    for name, colour in COLOURS.items():
        out.append(f'<rect x="{W - RIGHT + 10}" y="{ly}" width="10" height="10" fill="{colour}" opacity="0.5"/><text x="{W - RIGHT + 25}" y="{ly + 9}">{name}</text>')
        ly += 15
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
