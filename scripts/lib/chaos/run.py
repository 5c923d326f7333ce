"""The chaos run (started by scripts/chaos, which sets up the database, Redis and the variables):
a flash-sale workload through two `serve` processes, a nemesis injecting faults at seeded random
times, a sampler, a settling phase, then the checker (check.py) and the timeline (plot.py).

Everything a client saw goes to history.jsonl, the sampler's readings to samples.jsonl, the
faults to faults.jsonl, the settled end state to final.json; report.md and timeline.svg are
written from them (`python3 run.py --check-only DIR` judges a kept run again).
"""

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import check
import infra
import plot

STOP = threading.Event()  # the workload and the nemesis stop
PRICE_CENTS = 100
T0 = time.monotonic()


def now():
    return round(time.monotonic() - T0, 3)


class Log:
    """A JSON-lines file written by many threads."""

    def __init__(self, path):
        self.f = open(path, "w")
        self.lock = threading.Lock()

    def write(self, rec):
        line = json.dumps(rec, separators=(",", ":"))
        with self.lock:
            self.f.write(line + "\n")

    def close(self):
        with self.lock:
            self.f.flush()
            self.f.close()


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def jwt(secret, user, ttl=7200):
    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(json.dumps({"sub": str(user), "exp": int(time.time()) + ttl}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


class Client:
    """One thread's keep-alive connections to the two `serve` processes; every call is recorded
    in the history with its answer, or with "timeout"/"conn" when there was none."""

    def __init__(self, ports, history, timeout=5.0):
        self.ports, self.history, self.timeout = ports, history, timeout
        self.conns = {}

    def _conn(self, port):
        c = self.conns.get(port)
        if c is None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
            self.conns[port] = c
        return c

    def drop(self, port):
        c = self.conns.pop(port, None)
        if c is not None:
            c.close()

    def call(self, op, method, path, port=None, body=None, auth=None, rec=None, final=False):
        port = port or random.choice(self.ports)
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        if auth:
            headers["authorization"] = f"Bearer {auth}"
        entry = dict(rec or {})
        entry.update(op=op, t=now(), port=port)
        if final:
            entry["final"] = True
        start = time.monotonic()
        status, payload = None, None
        try:
            c = self._conn(port)
            c.request(method, path, body=data, headers=headers)
            res = c.getresponse()
            raw = res.read()
            status = res.status
            if res.getheader("connection", "").lower() == "close":
                self.drop(port)
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = None
        except TimeoutError:
            entry["err"] = "timeout"
            self.drop(port)
        except (OSError, http.client.HTTPException):
            entry["err"] = "conn"
            self.drop(port)
        entry["d"] = round(time.monotonic() - start, 4)
        entry["s"] = status
        if isinstance(payload, dict):
            for src, dst in (("code", "code"), ("reservation_id", "r"), ("status", "st"), ("order_id", "o")):
                if isinstance(payload.get(src), str):
                    entry[dst] = payload[src]
            if op not in ("me", "sse"):
                entry.pop("st", None)
            if op in ("pay", "cancel") and payload.get("status"):
                entry["order_status"] = payload["status"]
        self.history.write(entry)
        return status, payload


class Sales:
    """The products of the run: created with staggered starts and small stocks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.products = {}  # id -> {"stock", "starts", "ends"} (epoch seconds)

    def add(self, pid, stock, starts, ends):
        with self.lock:
            self.products[pid] = {"stock": stock, "starts": starts, "ends": ends}

    def live(self, rng):
        t = time.time()
        with self.lock:
            ids = [p for p, v in self.products.items() if v["starts"] - 0.5 <= t < v["ends"]]
        return rng.choice(ids) if ids else None

    def all(self):
        with self.lock:
            return dict(self.products)


def operator(args, sales, history, rng):
    """Creates a sale every --sale-every seconds (stock 5..40, start 4..10 s ahead, 60..150 s
    long) and preheats it; now and then preheats a live one without force (409 already_live) or
    with force (a rebuild: purchases answer 503 paused meanwhile)."""
    c = Client(args.admin_ports, history, timeout=15)
    tok = args.admin_token
    next_sale = 0.0
    while not STOP.is_set():
        if time.monotonic() >= next_sale:
            next_sale = time.monotonic() + args.sale_every
            start = datetime.now(timezone.utc) + timedelta(seconds=rng.uniform(4, 10))
            length = rng.uniform(60, 150)
            stock = rng.randint(5, 40)
            body = {
                "name": "chaos",
                "stock": stock,
                "price_cents": PRICE_CENTS,
                "starts_at": iso(start),
                "ends_at": iso(start + timedelta(seconds=length)),
            }
            s, created = c.call("create", "POST", "/api/v1/admin/products", body=body, auth=tok)
            if s == 201 and created:
                pid = created["product_id"]
                for _ in range(5):
                    s, _ = c.call("preheat", "POST", f"/api/v1/admin/products/{pid}/preheat", auth=tok, rec={"p": pid})
                    if s == 200:
                        break
                    STOP.wait(0.5)
                sales.add(pid, stock, start.timestamp(), start.timestamp() + length)
        roll = rng.random()
        pid = sales.live(rng)
        if pid is not None and roll < 0.03:
            c.call("force", "POST", f"/api/v1/admin/products/{pid}/preheat", body={"force": True}, auth=tok, rec={"p": pid})
        elif pid is not None and roll < 0.06:
            c.call("preheat", "POST", f"/api/v1/admin/products/{pid}/preheat", auth=tok, rec={"p": pid})
        STOP.wait(1.0)


class Winners:
    """Shoppers who won (or hold a reservation), handed to the followers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queue = []

    def put(self, item):
        with self.lock:
            self.queue.append(item)

    def take(self):
        with self.lock:
            return self.queue.pop(0) if self.queue else None


def shopper(args, sales, winners, history, seed):
    rng = random.Random(seed)
    c = Client(args.http_ports, history)
    while not STOP.is_set():
        pid = sales.live(rng)
        if pid is None:
            STOP.wait(0.3)
            continue
        user = rng.randint(1, args.shoppers)
        auth = jwt(args.jwt_secret, user)
        rec = {"u": user, "p": pid}
        s, tok = c.call("token", "POST", f"/api/v1/products/{pid}/token", auth=auth, rec=rec)
        if s != 200 or not tok:
            STOP.wait(args.think)
            continue
        s, res = c.call("reserve", "POST", f"/api/v1/products/{pid}/reservations", body={"token": tok["token"]}, auth=auth, rec=rec)
        if s == 202 or (s == 409 and res and res.get("reservation_id")):
            winners.put((pid, user, time.monotonic()))
        elif rng.random() < 0.05:
            c.call("me", "GET", f"/api/v1/products/{pid}/reservations/me", auth=auth, rec=rec)
        # A shopper told "sold out" comes back less often (units return as orders expire).
        STOP.wait(args.think * (10 if s == 410 else 1))


def read_sse(c, pid, user, auth, rec):
    """Opens the shopper's event stream (with a stream token), records the first events (up to
    two, within 3 s) and closes it."""
    s, tok = c.call("sse-token", "POST", f"/api/v1/products/{pid}/reservations/me/stream-token", auth=auth, rec=rec)
    if s != 200 or not tok:
        return
    port = random.choice(c.ports)
    entry = dict(rec, op="sse", t=now(), port=port)
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    events = 0
    try:
        conn.request("GET", f"/api/v1/products/{pid}/reservations/me/events?token={tok['token']}")
        res = conn.getresponse()
        entry["s"] = res.status
        if res.status == 200:
            while events < 2:
                line = res.fp.readline()
                if not line:
                    break
                if line.startswith(b"data:"):
                    try:
                        view = json.loads(line[5:])
                    except ValueError:
                        continue
                    if view.get("status"):
                        events += 1
                        e = dict(entry, st=view["status"], r=view.get("reservation_id"), d=round(time.monotonic() - start, 4))
                        history.write(e)
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()
    if events == 0:
        entry["d"] = round(time.monotonic() - start, 4)
        if entry.get("s") == 200:
            entry["s"] = None
            entry["err"] = "timeout"
        history.write(entry)


history = None  # set in main


def follower(args, winners, seed):
    """Follows a winner: /me (sometimes its event stream) until its order is confirmed, then
    pays (40%), cancels (20%) or lets it expire."""
    rng = random.Random(seed)
    c = Client(args.http_ports, history)
    while not STOP.is_set():
        item = winners.take()
        if item is None:
            STOP.wait(0.2)
            continue
        pid, user, since = item
        auth = jwt(args.jwt_secret, user)
        rec = {"u": user, "p": pid}
        order = None
        deadline = time.monotonic() + 20
        while not STOP.is_set() and time.monotonic() < deadline:
            if rng.random() < 0.2:
                read_sse(c, pid, user, auth, rec)
            s, view = c.call("me", "GET", f"/api/v1/products/{pid}/reservations/me", auth=auth, rec=rec)
            if s == 200 and view and view.get("order_id") and view.get("status") == "confirmed":
                order = view["order_id"]
                break
            if s == 200 and view and view.get("status") in ("paid", "cancelled", "expired", "rejected"):
                break
            if s == 404:
                break
            STOP.wait(0.5)
        if order is None:
            continue
        roll = rng.random()
        if roll < 0.4:
            # The shop's backend records the payment its provider confirmed (a retry now and
            # then, as after a timeout: the same answer).
            pay = {"payment_reference": f"ch_{order}", "amount_cents": PRICE_CENTS}
            for _ in range(2 if rng.random() < 0.2 else 1):
                c.call("pay", "POST", f"/api/v1/orders/{order}/payment", body=pay, auth=args.service_token, rec=rec)
        elif roll < 0.6:
            c.call("cancel", "POST", f"/api/v1/orders/{order}/cancel", auth=auth, rec=rec)


class Nemesis:
    """Faults in seeded random order: every round injects each enabled kind once, shuffled; a
    random gap between faults. Redis faults wait for a healthy deployment (a primary with an
    in-sync replica) first, so that each is the fault it says it is."""

    KINDS = (
        "serve-kill",
        "worker-kill",
        "pause",
        "redis-kill",
        "redis-failover",
        "rollback",
        "rabbitmq-stop",
        "postgres-stop",
        "blackhole",
    )

    def __init__(self, args, procs, redis, sales, faults, rng):
        self.args, self.procs, self.redis, self.sales = args, procs, redis, sales
        self.faults, self.rng = faults, rng
        self.kinds = [k for k in self.KINDS if k not in args.skip]

    def log(self, kind, target, t0, port=None):
        entry = {"t0": t0, "t1": now(), "kind": kind, "target": str(target)}
        if port is not None:
            entry["port"] = port  # a serve's: the port its answers carry in the history
        self.faults.write(entry)
        print(f"chaos: {now():7.1f}s {kind} {target} ({now() - t0:.1f} s)", flush=True)

    def run(self):
        STOP.wait(self.args.warmup)
        while not STOP.is_set():
            deck = list(self.kinds)
            self.rng.shuffle(deck)
            for kind in deck:
                if STOP.wait(self.rng.uniform(self.args.gap_min, self.args.gap_max)):
                    return
                getattr(self, kind.replace("-", "_"))()

    def hold(self, lo, hi):
        STOP.wait(self.rng.uniform(lo, hi))

    def _outage(self, kind, target, stop, start, lo, hi, port=None):
        """stop(), a hold of lo..hi seconds, start(): one fault, logged with its span."""
        t0 = now()
        stop()
        self.hold(lo, hi)
        start()
        self.log(kind, target, t0, port)

    def _kill(self, kind, role):
        p = self.rng.choice([p for p in self.procs if p.role == role])
        p.held = True  # down on purpose: the supervisor leaves it to the nemesis
        try:
            self._outage(kind, p.name, p.kill9, p.start, 0.5, 3)
        finally:
            p.held = False

    def serve_kill(self):
        self._kill("serve-kill", "serve")

    def worker_kill(self):
        self._kill("worker-kill", "worker")

    def pause(self):
        p = self.rng.choice(self.procs)
        port = p.port if p.role == "serve" else None
        self._outage("pause", p.name, p.pause, p.resume, 0.5, 10, port)

    def _kill_primary(self, kind, then):
        """kill -9 of the Redis primary (once the deployment is healthy), `then(port)`, and the
        old primary started again on its AOF; logged as `kind`."""
        self.redis.wait_healthy(30)
        port = self.redis.primary()
        if port is None:
            return
        t0 = now()
        self.redis.kill_node(port)
        then(port)
        self.redis.start_node(port)
        self.log(kind, port, t0)

    def redis_kill(self):
        """kill -9 of the primary and a restart on its AOF before the sentinels judge it down."""
        self._kill_primary("redis-kill", lambda port: None)

    def redis_failover(self):
        """kill -9 of the primary, the sentinels promote its replica (however far it lagged),
        then the old primary comes back as a replica."""

        def until_promoted(port):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.redis.primary() in (port, None):
                time.sleep(0.2)

        self._kill_primary("redis-failover", until_promoted)

    def rollback(self):
        """A product's keys put back as they were 2..8 s earlier, as a restored snapshot or a
        lagging replica would: DUMPed in one MULTI/EXEC (one moment) and RESTOREd in another
        (no client sees them half put back)."""
        pid = self.sales.live(self.rng)
        if pid is None:
            return
        keys = [f"{self.args.prefix}:{{p{pid}}}:{k}" for k in ("state", "outbox", "pending", "buyers", "status", "released")]
        t0 = now()
        snap = self.redis.on_primary(lambda c: c.transaction([("DUMP", k) for k in keys]))
        if snap is None:
            return
        self.hold(2, 8)
        back = [("DEL", k) if v is None else ("RESTORE", k, 0, v, "REPLACE") for k, v in zip(keys, snap)]
        self.redis.on_primary(lambda c: c.transaction(back))
        self.log("rollback", pid, t0)

    def rabbitmq_stop(self):
        self._outage("rabbitmq-stop", "rabbitmq", infra.rabbit_stop, infra.rabbit_start, 2, 10)

    def postgres_stop(self):
        self._outage("postgres-stop", "postgres", infra.pg_stop, infra.pg_start, 2, 10)

    def blackhole(self):
        port = str(self.rng.choice([self.redis.primary() or self.args.redis_nodes[0], 5672, 5432]))
        self._outage(
            "blackhole", port, lambda: infra.netfault("block", port), lambda: infra.netfault("unblock", port), 0.5, 8
        )


def sampler(args, redis, sales, samples, faults, interval=1.0):
    """Every second: live orders per product (Postgres), units left per product (Redis), and
    whether the sentinels promoted a replica (a "promoted" event in the faults)."""
    primary = redis.primary()
    while not STOP.is_set() or not args.sampling_done.is_set():
        t = now()
        rows = infra.psql(args.db, "select product_id, count(*) from orders where status in ('pending_payment','paid') group by 1", timeout=3)
        if rows is not None:
            samples.write({"t": t, "kind": "live", "live": {r[0]: int(r[1]) for r in rows}})
        ids = list(sales.all())
        if ids:
            # Stamped with the moment the reads began: each value was read at or after it (a
            # stamp taken after them claimed units free later than Redis had them: wins made
            # during the reads then looked like units left; found in fsync seed 21's run).
            read_at = now()
            got = redis.on_primary(lambda c: [c.cmd("HGET", f"{args.prefix}:{{p{p}}}:state", "remaining") for p in ids])
            if got is not None:
                samples.write({"t": read_at, "kind": "remaining", "remaining": {str(p): (int(v) if v is not None else None) for p, v in zip(ids, got)}})
        p = redis.primary()
        if p is not None and primary is not None and p != primary:
            faults.write({"t0": t, "t1": t, "kind": "promoted", "target": str(p)})
            print(f"chaos: {t:7.1f}s promoted {p} (was {primary})", flush=True)
        if p is not None:
            primary = p
        if STOP.wait(interval) and args.sampling_done.is_set():
            break


def supervise(procs, faults):
    """What a process manager does (systemd's Restart=always): a process that exited by itself
    (e.g. one restarted while Postgres was stopped cannot start, and exits) is started again
    a second later; each is recorded as an `exited` event."""
    while not STOP.is_set():
        for p in procs:
            if not getattr(p, "held", False) and p.popen is not None and not p.alive():
                t = now()
                code = p.popen.returncode
                p.start()
                faults.write({"t0": t, "t1": now(), "kind": "exited", "target": f"{p.name} (exit {code})"})
                print(f"chaos: {t:7.1f}s {p.name} exited ({code}); started again", flush=True)
        STOP.wait(1.0)


def heal(procs, redis):
    infra.netfault("clear")
    for p in procs:
        p.resume()
        if not p.alive():
            p.start()
    infra.rabbit_start()
    infra.pg_start()
    for port in redis.nodes:
        if redis.pid(port) is None or not os.path.exists(f"/proc/{redis.pid(port)}"):
            redis.start_node(port)


def settle(args, procs, redis, sales, timeout):
    """Waits until nothing is left in flight: every process ready, the queue empty, no winner
    pending in Redis, no order awaiting payment or its unit's return, no product recovering."""
    deadline = time.monotonic() + timeout
    why = "?"
    while time.monotonic() < deadline:
        time.sleep(1)
        if not all(p.ready(p.port) for p in procs):
            why = "a process is not ready"
            continue
        q = infra.queue_depths([args.queue])
        if q is None or q[args.queue]:
            why = f"queue {q}"
            continue
        rows = infra.psql(args.db, "select count(*) filter (where status = 'pending_payment'), count(*) filter (where status in ('cancelled','expired') and released_at is null) from orders")
        if rows is None or rows[0] != ["0", "0"]:
            why = f"orders in flux {rows}"
            continue
        ids = list(sales.all())
        pend = redis.on_primary(lambda c: [c.cmd("SCARD", f"{args.prefix}:{{p{p}}}:pending") for p in ids])
        if pend is None or any(pend):
            why = "winners pending in Redis"
            continue
        return None
    return why


def final_state(args, redis, sales, history):
    products = {}
    for pid, v in sales.all().items():
        got = redis.on_primary(lambda c: (c.cmd("HGET", f"{args.prefix}:{{p{pid}}}:state", "remaining"), c.cmd("SMEMBERS", f"{args.prefix}:{{p{pid}}}:pending")))
        remaining, pending_ids = got if got else (None, [])
        pending_ids = [r.decode() if isinstance(r, bytes) else r for r in (pending_ids or [])]
        pending = len(pending_ids)
        ends_t = round(v["ends"] - (time.time() - now()), 3)
        products[str(pid)] = {"stock": v["stock"], "remaining": int(remaining) if remaining is not None else None, "pending": pending, "pending_ids": pending_ids, "ends_t": ends_t}
    rows = None
    for _ in range(10):
        rows = infra.psql(args.db, "select order_id, user_id, product_id, reservation_id, status from orders", timeout=30)
        if rows is not None:
            break
        time.sleep(2)
    if rows is None:
        raise SystemExit("chaos: could not read the orders from Postgres")
    orders = [{"id": r[0], "user": int(r[1]), "product": int(r[2]), "reservation": r[3], "status": r[4]} for r in rows]
    depths = infra.queue_depths([args.queue, args.queue + ".dlq"]) or {}
    return {"products": products, "orders": orders, "queue": depths.get(args.queue), "dlq": depths.get(args.queue + ".dlq")}


def final_reads(args, history_records):
    """The settled /me of every shopper who was told of a win, or got no definite answer."""
    pairs = set()
    for h in history_records:
        if h["op"] == "reserve" and (h.get("s") in (202, None, 503) or h.get("r")):
            pairs.add((h["u"], h["p"]))
    c = Client(args.http_ports, history, timeout=10)
    for u, p in sorted(pairs):
        auth = jwt(args.jwt_secret, u)
        for _ in range(10):
            s, _ = c.call("me", "GET", f"/api/v1/products/{p}/reservations/me", auth=auth, rec={"u": u, "p": p}, final=True)
            if s in (200, 404):
                break
            time.sleep(1)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def judge(out, setting, seed, minutes):
    run = {
        "setting": setting,
        "history": read_jsonl(os.path.join(out, "history.jsonl")),
        "samples": read_jsonl(os.path.join(out, "samples.jsonl")),
        "faults": read_jsonl(os.path.join(out, "faults.jsonl")),
        "final": json.load(open(os.path.join(out, "final.json"))),
    }
    report = check.check(run)
    text = check.render(report, run["faults"], seed, minutes)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    plot.timeline(run, os.path.join(out, "timeline.svg"))
    print(text)
    return report.ok


def main():
    global history
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--setting", default="fsync")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--db")
    ap.add_argument("--prefix")
    ap.add_argument("--queue")
    ap.add_argument("--serves", default="")  # http:admin,http:admin
    ap.add_argument("--workers", default="")  # ports
    ap.add_argument("--redis-nodes", default="")
    ap.add_argument("--sentinels", default="")
    ap.add_argument("--sentinel-name", default="seckill")
    ap.add_argument("--sentinel-dir", default="")
    ap.add_argument("--shoppers", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=24)
    ap.add_argument("--followers", type=int, default=8)
    ap.add_argument("--think", type=float, default=0.02)
    ap.add_argument("--sale-every", type=float, default=15)
    ap.add_argument("--warmup", type=float, default=8)
    ap.add_argument("--gap-min", type=float, default=2)
    ap.add_argument("--gap-max", type=float, default=8)
    ap.add_argument("--settle", type=float, default=180)
    ap.add_argument("--skip", default="", help="fault kinds not to inject, comma-separated")
    ap.add_argument("--jwt-secret", default="seckill-dev-jwt-secret-do-not-use-in-production")
    ap.add_argument("--admin-token", default="seckill-dev-admin-token")
    ap.add_argument("--service-token", default="seckill-dev-service-token-do-not-use-in-production")
    args = ap.parse_args()
    meta_path = os.path.join(args.out, "meta.json")
    if args.check_only:
        # The run's own seed and length, for the report (older runs kept none: the arguments).
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            args.seed, args.minutes = meta["seed"], meta["minutes"]
        sys.exit(0 if judge(args.out, args.setting, args.seed, args.minutes) else 1)

    args.skip = set(filter(None, args.skip.split(",")))
    serves = [tuple(int(x) for x in s.split(":")) for s in args.serves.split(",")]
    args.http_ports = [h for h, _ in serves]
    args.admin_ports = [a for _, a in serves]
    args.redis_nodes = [int(p) for p in args.redis_nodes.split(",")]
    args.sampling_done = threading.Event()
    os.makedirs(args.out, exist_ok=True)
    with open(meta_path, "w") as f:
        json.dump({"seed": args.seed, "minutes": args.minutes, "setting": args.setting}, f)
    history = Log(os.path.join(args.out, "history.jsonl"))
    samples = Log(os.path.join(args.out, "samples.jsonl"))
    faults = Log(os.path.join(args.out, "faults.jsonl"))
    rng = random.Random(args.seed)
    redis = infra.Redis(args.redis_nodes, [int(p) for p in args.sentinels.split(",")], args.sentinel_name, args.sentinel_dir)

    procs = []
    env = dict(os.environ)
    for i, (h, a) in enumerate(serves, 1):
        p = infra.Proc(f"serve-{i}", "serve", dict(env, SECKILL_HTTP_ADDR=f"127.0.0.1:{h}", SECKILL_ADMIN_ADDR=f"127.0.0.1:{a}"), os.path.join(args.out, f"serve-{i}.log"))
        p.port = h
        procs.append(p)
    for i, w in enumerate(int(x) for x in args.workers.split(",")):
        p = infra.Proc(f"worker-{i + 1}", "worker", dict(env, SECKILL_WORKER_ADDR=f"127.0.0.1:{w}"), os.path.join(args.out, f"worker-{i + 1}.log"))
        p.port = w
        procs.append(p)

    def on_signal(signum, _frame):
        STOP.set()
        args.sampling_done.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    ok = False
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60
        while not all(p.ready(p.port) for p in procs):
            if time.monotonic() > deadline:
                raise SystemExit("chaos: the seckill processes did not become ready in 60 s")
            time.sleep(0.2)
        print(f"chaos: {len(procs)} processes ready; seed {args.seed}, {args.minutes} min, durability {args.setting}", flush=True)
        sales = Sales()
        winners = Winners()
        threads = [threading.Thread(target=operator, args=(args, sales, history, random.Random(rng.random())), daemon=True)]
        threads += [threading.Thread(target=shopper, args=(args, sales, winners, history, rng.random()), daemon=True) for _ in range(args.threads)]
        threads += [threading.Thread(target=follower, args=(args, winners, rng.random()), daemon=True) for _ in range(args.followers)]
        nemesis = Nemesis(args, procs, redis, sales, faults, random.Random(rng.random()))
        nem = threading.Thread(target=nemesis.run, daemon=True)
        samp = threading.Thread(target=sampler, args=(args, redis, sales, samples, faults), daemon=True)
        sup = threading.Thread(target=supervise, args=(procs, faults), daemon=True)
        for t in threads + [nem, samp, sup]:
            t.start()
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(10)
            print(f"chaos: {now():7.1f}s {len(sales.all())} sales", flush=True)
        STOP.set()
        nem.join()
        for t in threads:
            t.join(30)
        print(f"chaos: {now():7.1f}s workload stopped; healing every fault", flush=True)
        heal(procs, redis)
        why = settle(args, procs, redis, sales, args.settle)
        if why:
            print(f"chaos: did not settle within {args.settle:g} s: {why}", flush=True)
        print(f"chaos: {now():7.1f}s settled; reading the end state", flush=True)
        args.sampling_done.set()
        samp.join(10)
        history.f.flush()
        final_reads(args, read_jsonl(os.path.join(args.out, "history.jsonl")))
        state = final_state(args, redis, sales, history)
        with open(os.path.join(args.out, "final.json"), "w") as f:
            json.dump(state, f)
        for log in (history, samples, faults):
            log.close()
        ok = judge(args.out, args.setting, args.seed, args.minutes)
    finally:
        STOP.set()
        args.sampling_done.set()
        for p in procs:
            p.stop()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
