"""The chaos run's checker: judges what clients saw (the history), what was sampled while the
run went on, and the settled end state against seckill's promises (docs/guarantees.md).

Pure: `check(run)` takes plain data and returns a report; nothing here talks to a server, so the
unit tests (test_check.py) feed it hand-made histories. The shapes (written by run.py):

- history: one record per request, in the order it ended:
  {"t": start s, "d": duration s, "op": "token"|"reserve"|"me"|"pay"|"cancel"|"sse"|...,
   "u": user, "p": product, "s": HTTP status or None (no answer), "err": "timeout"|"conn"|None,
   "code": problem code, "r": reservation id, "st": reservation status (from /me and SSE),
   "final": True for the settling phase's reads}
- samples: {"t", "kind": "live", "live": {product: live orders}} from Postgres and
  {"t", "kind": "remaining", "remaining": {product: units left or None}} from Redis
- faults: {"t0", "t1", "kind", "target"}; kind "promoted" marks a Redis replica promoted (a
  failover, whatever caused it), observed rather than injected
- final: {"products": {p: {"stock", "remaining" (None: no state in Redis), "pending"}},
  "orders": [{"id", "user", "product", "reservation", "status"}], "queue": n, "dlq": n}
- setting: the SECKILL_REDIS_DURABILITY of the run
"""

import bisect
from collections import defaultdict

LIVE = ("pending_payment", "paid")
# A reservation status /me reports once an order backs it; none of them may become a 404.
ORDER_BACKED = ("confirmed", "paid", "cancelled", "expired")

# What each durability setting may lose, by the fault that loses it (docs/failure-model.md,
# "Durability: what a 202 survives"): a 202 lost after one of these is "allowed by the setting".
# A rollback is an old snapshot restored, which no setting survives.
ALLOWED_LOSS = {
    "fsync": {"promoted", "rollback"},
    "replicas:1": {"rollback"},
    "none": {"promoted", "rollback", "redis-kill"},
}

# A 410 sold_out while Redis counted a unit free, for longer than this, contradicts the sold-out
# memory's bound: every process drops it on the release's pub/sub message (or on a lost
# subscription) and trusts it for at most 1 s without one (src/soldout.rs), so it may be stale
# for a second and a message's flight, not longer.
SOLD_OUT_BOUND_S = 2.0

PROMISES = (
    "oversold",
    "lost",
    "duplicated",
    "phantom",
    "stranded",
    "stuck",
    "contradiction",
    "internal",
)


class Report:
    def __init__(self, setting):
        self.setting = setting
        # promise -> {"allowed": [...], "violations": [...]}; each entry a dict with details
        self.found = {p: {"allowed": [], "violations": []} for p in PROMISES}
        self.stats = defaultdict(int)
        self.unverifiable = []

    def violate(self, promise, **detail):
        self.found[promise]["violations"].append(detail)

    def allow(self, promise, **detail):
        self.found[promise]["allowed"].append(detail)

    def count(self, promise, allowed=False):
        return len(self.found[promise]["allowed" if allowed else "violations"])

    @property
    def ok(self):
        return all(not v["violations"] for v in self.found.values())


def _key(p):
    return str(p)


def check(run):
    setting = run["setting"]
    history = run["history"]
    samples = run.get("samples", [])
    faults = run.get("faults", [])
    final = run["final"]
    report = Report(setting)
    allowed_kinds = ALLOWED_LOSS.get(setting, set())
    stocks = {_key(p): v["stock"] for p, v in final["products"].items()}

    _oversold(report, samples, final, stocks)
    seen, indefinite, wins = _observations(history, report)
    orders_by_res, orders_by_user = _orders(final["orders"])
    _lost(report, history, wins, orders_by_res, faults, allowed_kinds)
    _duplicated(report, final["orders"])
    _phantom(report, final["orders"], seen, indefinite)
    _stranded(report, final, orders_by_user, faults)
    _stuck(report, history, final)
    _contradictions(report, history, samples, faults)
    _internal(report, history)
    return report


def _internal(report, history):
    """A 5xx other than 503: a failure seckill did not foresee (every outage it knows of is a
    503 with a code saying which)."""
    for h in history:
        s = h.get("s")
        if s is not None and s >= 500 and s != 503:
            report.violate("internal", op=h["op"], user=h.get("u"), product=h.get("p"), t=h["t"], why=f"{s} {h.get('code') or ''}".strip())


def _oversold(report, samples, final, stocks):
    for s in samples:
        if s.get("kind") != "live":
            continue
        for p, live in s["live"].items():
            stock = stocks.get(_key(p))
            if stock is not None and live > stock:
                report.violate("oversold", product=p, t=s["t"], live=live, stock=stock, at="sampled")
    live_end = defaultdict(int)
    for o in final["orders"]:
        if o["status"] in LIVE:
            live_end[_key(o["product"])] += 1
    for p, n in live_end.items():
        stock = stocks.get(p)
        if stock is not None and n > stock:
            report.violate("oversold", product=p, live=n, stock=stock, at="end")


def _observations(history, report):
    """Reservation ids a client saw during the run (a 202, a 409's id, /me, an event), the
    (user, product) pairs with an indefinite purchase answer (no answer, or 503 unavailable: a
    replica wait that failed), and every 202: (user, product) -> (reservation, time)."""
    seen, indefinite, wins = set(), set(), {}
    for h in history:
        if h.get("final"):
            if h["op"] == "me":
                report.stats[f"settled /me: {h.get('s')} {h.get('st') or h.get('code') or ''}".rstrip()] += 1
            continue
        if h["op"] in ("reserve", "me", "pay", "cancel", "sse", "force", "preheat"):
            answer = h.get("code") or h.get("st") or h.get("err") or ""
            report.stats[f"{h['op']}: {h.get('s')} {answer}".rstrip()] += 1
        if h.get("r"):
            seen.add(h["r"])
        if h["op"] != "reserve":
            continue
        report.stats["attempts"] += 1
        up = (h["u"], _key(h["p"]))
        if h.get("s") is None or (h["s"] == 503 and h.get("code") == "unavailable"):
            indefinite.add(up)
            report.stats["indefinite answers"] += 1
        elif h["s"] == 202:
            report.stats["202s"] += 1
            if any(r != h["r"] for r, _ in wins.get(up, [])):
                report.stats["second wins"] += 1
            wins.setdefault(up, []).append((h["r"], h["t"]))
    return seen, indefinite, wins


def _orders(orders):
    by_res, by_user = {}, defaultdict(list)
    for o in orders:
        by_res[o["reservation"]] = o
        by_user[(o["user"], _key(o["product"]))].append(o)
    return by_res, by_user


def _final_me(history):
    """The settling phase's /me answer per (user, product)."""
    out = {}
    for h in history:
        if h.get("final") and h["op"] == "me":
            out[(h["u"], _key(h["p"]))] = h
    return out


def _lost(report, history, wins, orders_by_res, faults, allowed_kinds):
    final_me = _final_me(history)
    for up, list_ in wins.items():
        for r, t in list_:
            if r in orders_by_res:
                continue
            me = final_me.get(up)
            detail = dict(user=up[0], product=up[1], reservation=r, t=t)
            if me is None:
                report.violate("lost", why="no final /me read", **detail)
                continue
            if me.get("s") == 200 and me.get("st") == "rejected":
                report.stats["rejected (definite)"] += 1
                continue
            definite = True
            if me.get("s") == 200 and me.get("r") != r and me.get("st") in ORDER_BACKED:
                why = f"/me shows another reservation ({me.get('r')}, {me.get('st')})"
            elif me.get("s") == 404 and me.get("code") == "no_reservation":
                why = "404 no_reservation"
            else:
                why = f"final /me {me.get('s')} {me.get('code') or me.get('st')}"
                definite = False
            # Only a definite end may be a loss the setting allows, and only after a fault that
            # loses wins under it.
            causes = sorted(
                {f["kind"] for f in faults if f["kind"] in allowed_kinds and f["t0"] >= t - 1.0}
            )
            if definite and causes:
                report.allow("lost", why=why, causes=causes, **detail)
            else:
                report.violate("lost", why=why, **detail)


def _duplicated(report, orders):
    per_user, per_res = defaultdict(list), defaultdict(list)
    for o in orders:
        per_user[(o["user"], _key(o["product"]))].append(o["id"])
        per_res[o["reservation"]].append(o["id"])
    for (u, p), ids in per_user.items():
        if len(ids) > 1:
            report.violate("duplicated", user=u, product=p, orders=ids, why="two orders for one user")
    for r, ids in per_res.items():
        if len(ids) > 1:
            report.violate("duplicated", reservation=r, orders=ids, why="two orders for one reservation")


def _phantom(report, orders, seen, indefinite):
    for o in orders:
        if o["reservation"] in seen:
            continue
        detail = dict(user=o["user"], product=o["product"], reservation=o["reservation"])
        if (o["user"], _key(o["product"])) in indefinite:
            report.allow("phantom", why="its request had no definite answer", **detail)
        else:
            report.violate("phantom", why="no client was told of it", **detail)


# Faults that may lose writes Redis took without a durability wait (statuses, returned units)
# under every setting: the settings cover wins. For a sale still on, the fences catch a lost
# returned unit and rebuild the sale; once it has ended, a unit Redis forgot is off sale with
# nothing left to sell it in.
LOSE_UNWAITED = {"promoted", "rollback", "redis-kill"}


def _stranded(report, final, orders_by_user, faults=()):
    live = defaultdict(int)
    for (_, p), os_ in orders_by_user.items():
        live[p] += sum(1 for o in os_ if o["status"] in LIVE)
    for p, v in final["products"].items():
        p = _key(p)
        if v.get("remaining") is None:
            report.unverifiable.append(dict(product=p, why="no state in Redis at the end"))
            continue
        # A unit is won-and-pending only while its win has no order yet (a stale pending entry
        # of an order is counted once, as the order).
        ordered = {o["reservation"] for os_ in orders_by_user.values() for o in os_}
        pending = v.get("pending", 0)
        if "pending_ids" in v:
            pending = sum(1 for r in v["pending_ids"] if r not in ordered)
        total = v["remaining"] + pending + live[p]
        if total != v["stock"] or v["remaining"] > v["stock"]:
            ended = v.get("ends_t")
            after_end = ended is not None and any(
                f["kind"] in LOSE_UNWAITED and f["t0"] >= ended - 1.0 for f in faults
            )
            (report.allow if total < v["stock"] and after_end else report.violate)(
                "stranded",
                product=p,
                remaining=v["remaining"],
                pending=pending,
                live=live[p],
                stock=v["stock"],
                why="a unit returned twice" if total > v["stock"] else "a unit neither sold nor on sale",
            )


def _stuck(report, history, final):
    for p, v in final["products"].items():
        if v.get("pending"):
            report.violate("stuck", product=_key(p), pending=v["pending"], why="won, never persisted")
    for (u, p), me in _final_me(history).items():
        if me.get("s") == 200 and me.get("st") == "pending":
            report.violate("stuck", user=u, product=p, why="/me still pending after settling")
        elif me.get("s") == 503:
            report.violate("stuck", user=u, product=p, why=f"/me 503 {me.get('code')} after settling")
    for q in ("queue", "dlq"):
        n = final.get(q)
        if n:
            report.violate("stuck", queue=q, messages=n, why=f"{n} message(s) left in the {q}")


def _frozen(pauses, start, end):
    """Seconds of [start, end] during which a serve was paused (SIGSTOP), from its `pauses`
    [(t0, t1)]: it could not read the message that clears its sold-out memory then."""
    return sum(max(0.0, min(end, t1) - max(start, t0)) for t0, t1 in pauses)


def _contradictions(report, history, samples, faults=()):
    remaining = defaultdict(list)  # product -> [(t, remaining)]
    for s in samples:
        if s.get("kind") == "remaining":
            for p, n in s["remaining"].items():
                remaining[_key(p)].append((s["t"], n))
    for series in remaining.values():
        series.sort(key=lambda tn: tn[0])
    times = {p: [t for t, _ in series] for p, series in remaining.items()}
    pauses = defaultdict(list)  # a serve's port -> its pauses
    for f in faults:
        if f.get("kind") == "pause" and f.get("port") is not None:
            pauses[f["port"]].append((f["t0"], f["t1"]))
    # Units leave Redis only by wins, and every win is an answer some client got (or did not
    # get: a timeout). Requests that may have won, per product: (start, end), by end.
    # A request its client gave up on may still be decided later: one a paused serve held is
    # decided when it resumes (up to a second after), whatever the client saw by then.
    may_win = defaultdict(list)
    for h in history:
        if h["op"] == "reserve" and (h.get("s") in (202, 503, None)):
            end = h["t"] + h.get("d", 0)
            if h.get("s") is None:
                for t0, t1 in pauses.get(h.get("port"), ()):
                    if t0 <= end and t1 >= h["t"]:
                        end = max(end, t1 + 1.0)
            may_win[_key(h["p"])].append((end, h["t"]))
    for wins in may_win.values():
        wins.sort()
    for h in history:
        if not (h["op"] == "reserve" and h.get("s") == 410 and h.get("code") == "sold_out"):
            continue
        p = _key(h["p"])
        series = remaining.get(p)
        if not series:
            continue
        end = h["t"] + h.get("d", 0)
        # The last reading at least the bound before the answer — counting only the time the
        # answering process ran (paused, it read no message): if it counted more units than could
        # have been won since, units were free from then until the answer. The running time
        # shrinks as the reading gets later: the last one that qualifies is found by bisection.
        own = pauses.get(h.get("port"), ())
        lo, hi = 0, bisect.bisect_right(times[p], h["t"] - SOLD_OUT_BOUND_S)
        while lo < hi:
            mid = (lo + hi) // 2
            t = series[mid][0]
            if h["t"] - t - _frozen(own, t, h["t"]) >= SOLD_OUT_BOUND_S:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0 or not series[lo - 1][1]:
            continue  # no reading that old, no state, or none free
        t1, n1 = series[lo - 1]
        ended = may_win[p]

        def won_since(t):
            first = bisect.bisect_left(ended, (t, float("-inf")))
            return sum(1 for _, a in ended[first:] if a <= end)

        wins = won_since(t1)
        # Units were free all along only if every reading since then still counted more than
        # could have been won after it: a state Redis forgot and rebuilt (a failover to a
        # lagging replica, a rollback — found by seed 21: 6 "free" units that had been won)
        # drops to what is really left without a win, and a 410 after that is the truth.
        later = series[lo : bisect.bisect_left(times[p], h["t"])]
        if n1 > wins and all(n is not None and n > won_since(t) for t, n in later):
            report.violate(
                "contradiction",
                user=h["u"],
                product=h["p"],
                t=h["t"],
                why=f"410 sold_out {h['t'] - t1:.1f} s after Redis counted {n1} units free, of which at most {wins} were won since",
            )
    last = {}
    for h in history:
        if h["op"] not in ("me", "sse") or h.get("s") is None:
            continue
        up = (h["u"], _key(h["p"]))
        prev = last.get(up)
        if h["s"] == 200 and h.get("st"):
            if prev == "paid" and h["st"] in ("pending", "confirmed"):
                report.violate("contradiction", user=up[0], product=up[1], t=h["t"], why=f"/me said paid, then {h['st']}")
            last[up] = h["st"]
        elif h["s"] == 404 and h.get("code") == "no_reservation" and prev in ORDER_BACKED:
            report.violate("contradiction", user=up[0], product=up[1], t=h["t"], why=f"/me said {prev}, then 404")


def attribute(report, faults, window=(-2.0, 30.0)):
    """Per fault kind: how many were injected, and how many findings of each promise had one of
    that kind start within `window` seconds of them (findings without a time count for every
    kind injected). A hint for where to look, not a cause."""
    kinds = defaultdict(lambda: {"injected": 0, "seconds": 0.0})
    for f in faults:
        k = kinds[f["kind"]]
        k["injected"] += 1
        k["seconds"] += max(0.0, f["t1"] - f["t0"])
    table = {}
    for kind, k in kinds.items():
        row = {"injected": k["injected"], "seconds": round(k["seconds"], 1)}
        starts = [f["t0"] for f in faults if f["kind"] == kind]
        for promise in PROMISES:
            n = 0
            for side in ("violations", "allowed"):
                for v in report.found[promise][side]:
                    t = v.get("t")
                    if t is None or any(t + window[0] <= s <= t + window[1] for s in starts):
                        n += 1
            row[promise] = n
        table[kind] = row
    return table


# Said up front in every report: what the run's setting may lose, and to which faults.
MAY_LOSE = {
    "fsync": "a win a promoted replica had not received (a failover), and a rolled-back product's wins",
    "replicas:1": "a rolled-back product's wins only (every 202 waited for the replica)",
    "none": "a win Redis had not persisted or replicated (a restart, a failover), and a rolled-back product's wins",
}


def render(report, faults, seed, minutes):
    lines = [f"# chaos run: seed {seed}, {minutes} min, SECKILL_REDIS_DURABILITY={report.setting}", ""]
    lines.append(f"May lose (allowed): {MAY_LOSE.get(report.setting, 'nothing stated')}.")
    lines.append("")
    lines.append("## Faults (near: findings of each promise within -2 s..+30 s of one)")
    lines.append("")
    table = attribute(report, faults)
    head = "| fault | injected | seconds | " + " | ".join(PROMISES) + " |"
    lines += [head, "|" + "---|" * (3 + len(PROMISES))]
    for kind in sorted(table):
        row = table[kind]
        lines.append(
            f"| {kind} | {row['injected']} | {row['seconds']} | "
            + " | ".join(str(row[p]) for p in PROMISES)
            + " |"
        )
    lines += ["", "## Promises", "", "| promise | violations | allowed by the setting |", "|---|---|---|"]
    for p in PROMISES:
        lines.append(f"| {p} | {report.count(p)} | {report.count(p, allowed=True)} |")
    lines += ["", "## Counts", ""]
    for k in sorted(report.stats):
        lines.append(f"- {k}: {report.stats[k]}")
    if report.unverifiable:
        lines.append(f"- not verifiable: {len(report.unverifiable)} product(s) ({report.unverifiable[:3]})")
    for p in PROMISES:
        for side, title in (("violations", "VIOLATION"), ("allowed", "allowed")):
            items = report.found[p][side]
            for v in items[:10]:
                lines.append(f"- {title} {p}: {v}")
            if len(items) > 10:
                lines.append(f"- … and {len(items) - 10} more {title} {p}")
    lines += ["", "verdict: " + ("ok" if report.ok else "VIOLATIONS not allowed by the setting")]
    return "\n".join(lines) + "\n"
