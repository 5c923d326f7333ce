"""What the chaos run drives besides HTTP: its seckill processes (started, killed, paused and
restarted by pid), its Sentinel-watched Redis (scripts/redis-sentinel), Redis commands (a small
RESP client), the machine's RabbitMQ and Postgres (stopped and started), and packet loss
(scripts/netfault). Python's standard library only."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def sh(*args, timeout=60, check=False, env=None):
    """Runs a command; its stdout (stripped), or None if it failed or timed out."""
    try:
        out = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env
        )
    except (subprocess.TimeoutExpired, OSError):
        if check:
            raise
        return None
    if out.returncode != 0:
        if check:
            raise RuntimeError(f"{' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
        return None
    return out.stdout.strip()


class Proc:
    """One seckill process: its role, environment and log; restartable."""

    def __init__(self, name, role, env, log):
        self.name, self.role, self.env, self.log = name, role, env, log
        self.popen = None
        self.stopped = False  # SIGSTOPped

    def start(self):
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                [self.env["CHAOS_BIN"], self.role],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.stopped = False

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def kill9(self):
        if self.alive():
            if self.stopped:
                os.kill(self.popen.pid, signal.SIGCONT)
            self.popen.kill()
            self.popen.wait()
        self.stopped = False

    def pause(self):
        if self.alive():
            os.kill(self.popen.pid, signal.SIGSTOP)
            self.stopped = True

    def resume(self):
        if self.alive() and self.stopped:
            os.kill(self.popen.pid, signal.SIGCONT)
        self.stopped = False

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s."""
        if not self.alive():
            return
        self.resume()
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def ready(self, port):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


class Resp:
    """A minimal RESP2 client: one connection, commands one at a time."""

    def __init__(self, port, timeout=2.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")

    @staticmethod
    def _encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def cmd(self, *args):
        self.sock.sendall(self._encode(args))
        return self._reply()

    def transaction(self, commands):
        """The commands in one MULTI/EXEC: their replies, all from one moment."""
        self.sock.sendall(b"".join(self._encode(c) for c in [("MULTI",), *commands, ("EXEC",)]))
        self._reply()  # OK
        for _ in commands:
            self._reply()  # QUEUED
        return self._reply()


class Redis:
    """The run's Sentinel deployment (scripts/redis-sentinel, with the SECKILL_SENTINEL_*
    variables the run exported)."""

    def __init__(self, nodes, sentinels, name, state_dir):
        self.nodes, self.sentinels, self.name, self.dir = nodes, sentinels, name, state_dir

    def script(self, *args, timeout=60):
        env = dict(
            os.environ,
            SECKILL_SENTINEL_NODES=" ".join(map(str, self.nodes)),
            SECKILL_SENTINEL_SENTINELS=" ".join(map(str, self.sentinels)),
            SECKILL_SENTINEL_NAME=self.name,
            SECKILL_SENTINEL_DIR=self.dir,
            SECKILL_SENTINEL_DOWN_MS="2000",
        )
        return sh("bash", os.path.join(ROOT, "scripts", "redis-sentinel"), *args, timeout=timeout, env=env)

    def primary(self):
        for s in self.sentinels:
            try:
                c = Resp(s, timeout=1.0)
                try:
                    addr = c.cmd("SENTINEL", "get-master-addr-by-name", self.name)
                finally:
                    c.close()
                if addr:
                    return int(addr[1])
            except (OSError, RuntimeError, ValueError):
                continue
        return None

    def healthy(self):
        return self.script("status", timeout=20) is not None

    def wait_healthy(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.healthy():
                return True
            time.sleep(0.5)
        return False

    def pid(self, port):
        try:
            with open(os.path.join(self.dir, f"node-{port}.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def kill_node(self, port):
        self.script("kill-node", str(port))

    def start_node(self, port):
        self.script("start-node", str(port))

    def on_primary(self, fn):
        """fn(Resp) on the primary; None if it did not answer."""
        port = self.primary()
        if port is None:
            return None
        try:
            c = Resp(port)
        except OSError:
            return None
        try:
            return fn(c)
        except (OSError, RuntimeError, ConnectionError):
            return None
        finally:
            c.close()


def pg_cluster():
    """The Debian cluster version of the machine's Postgres ("15")."""
    out = sh("pg_lsclusters", "-h") or ""
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "main":
            return parts[0]
    return None


def pg_stop():
    v = pg_cluster()
    sh("pg_ctlcluster", "--skip-systemctl-redirect", v, "main", "stop", "-m", "fast", timeout=60)


def pg_start():
    v = pg_cluster()
    sh("pg_ctlcluster", "--skip-systemctl-redirect", v, "main", "start", timeout=60)


def psql(db, sql, timeout=5):
    """Rows of a query as lists of strings (tab-separated), or None if Postgres did not answer."""
    out = sh(
        "psql", "-qAtX", "-F", "\t", "-h", "127.0.0.1", "-U", "postgres", "-d", db,
        "-v", "ON_ERROR_STOP=1", "-c", sql, timeout=timeout,
    )
    if out is None:
        return None
    return [line.split("\t") for line in out.splitlines() if line]


def rabbit_stop():
    sh("rabbitmqctl", "-q", "stop_app", timeout=60)


def rabbit_start():
    sh("rabbitmqctl", "-q", "start_app", timeout=120)
    sh("rabbitmqctl", "-q", "await_startup", timeout=120)


def queue_depths(names):
    """Messages per queue, or None if RabbitMQ did not answer."""
    out = sh("rabbitmqctl", "-q", "list_queues", "name", "messages", "--formatter", "json", timeout=30)
    if out is None:
        return None
    try:
        rows = json.loads(out)
    except ValueError:
        return None
    by_name = {r["name"]: int(r["messages"]) for r in rows}
    return {n: by_name.get(n, 0) for n in names}


def netfault(*args):
    sh("bash", os.path.join(ROOT, "scripts", "netfault"), *args, timeout=30)
