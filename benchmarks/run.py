"""Throughput, latency and memory benchmark of the help desk stack.

    .venv/bin/python benchmarks/run.py                 # start a private stack, run every phase
    .venv/bin/python benchmarks/run.py --duration 20 --rounds 3
    .venv/bin/python benchmarks/run.py --base-url http://localhost:8000 \\
        --amqp-uri amqp://guest:guest@localhost:5672/      # measure a running stack

Phases (one run, same stack):
  rpc      the raw nameko RPC ceiling: ``tickets.health_ping`` from N callers (one long-lived
           ClusterRpcProxy each, green threads in a separate process)
  create1  ``POST /v1/tickets`` from 1 keep-alive HTTP client
  createN  ``POST /v1/tickets`` from N keep-alive HTTP clients (one OS process each, own token)
  fill     more creates until the run has made --fill tickets, then VmRSS of gateway and tickets

Exits 0 whether or not the targets are met; the verdicts are the PASS/FAIL lines.
See benchmarks/README.md.
"""
import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGET_RATIO = 0.35
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 150.0


def log(message: str = "") -> None:
    print(message, file=sys.stderr, flush=True)


# --- statistics -------------------------------------------------------------------------------

def percentile(values, pct):
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(pct / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def summarise(latencies, window, errors, client_cpu):
    return {
        "ok": len(latencies),
        "errors": errors,
        "per_second": len(latencies) / window if window > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": (max(latencies) * 1000) if latencies else float("nan"),
        "window_s": window,
        "loadgen_cpu_pct": 100.0 * client_cpu / window if window > 0 else 0.0,
    }


# --- processes: CPU and memory from /proc -----------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def pids_listening_on(port):
    """Pids with a listening TCP socket on ``port`` (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            pass
    pids = set()
    if not inodes:
        return pids
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    pids.add(int(pid))
                    break
        except OSError:
            continue
    return pids


class CpuWatch:
    """CPU seconds used by named processes between start() and stop()."""

    def __init__(self, pids: dict):
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.before = {}

    def start(self):
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.t0 = time.monotonic()

    def stop(self, result: dict, operations: int) -> None:
        """Adds ``server_cpu_pct`` (share of one core) and ``server_cpu_ms_per_op`` to ``result``."""
        wall = time.monotonic() - self.t0
        pct, per_op = {}, {}
        for name, pid in self.pids.items():
            now, before = cpu_seconds(pid), self.before.get(name)
            if now is not None and before is not None and wall > 0:
                pct[name] = 100.0 * (now - before) / wall
                if operations:
                    per_op[name] = 1000.0 * (now - before) / operations
        result["server_cpu_pct"] = pct
        result["server_cpu_ms_per_op"] = per_op


def broker_pid():
    """The local RabbitMQ (beam.smp) if it runs on this machine; shared, so only indicative."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "beam.smp":
                        return int(pid)
            except OSError:
                continue
    return None


def load_average() -> str:
    """Load average (1, 5, 15 min) and, where the kernel has PSI, the share of the last 10 s in
    which some task waited for a CPU: other people's work on a shared machine shows up here."""
    try:
        with open("/proc/loadavg") as f:
            text = " ".join(f.read().split()[:3])
    except OSError:
        return "?"
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()[1].split("=")[1]
        text += f", cpu pressure {float(some):.0f}%"
    except (OSError, IndexError, ValueError):
        pass
    return text


# --- the stack ----------------------------------------------------------------------------------

def port_is_free(port: int) -> bool:
    # a plain bind (no SO_REUSEPORT) fails if anyone listens, even an eventlet server
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    if port_is_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Broker:
    """A throwaway vhost: management API first, rabbitmqctl as a fallback."""

    def __init__(self, management_url: str, host: str, user: str, password: str):
        self.management_url = management_url.rstrip("/")
        self.host, self.user, self.password = host, user, password
        self.vhost = None

    def _api(self, method, path, body=None):
        request = urllib.request.Request(
            self.management_url + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"content-type": "application/json", "Authorization": "Basic " + base64.b64encode(
                f"{self.user}:{self.password}".encode()).decode()})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    def create(self, name: str) -> str:
        quoted = urllib.parse.quote(name, safe="")
        try:
            self._api("PUT", f"/api/vhosts/{quoted}")
            self._api("PUT", f"/api/permissions/{quoted}/{self.user}",
                      {"configure": ".*", "write": ".*", "read": ".*"})
            self.method = "api"
        except (urllib.error.URLError, OSError):
            subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True)
            subprocess.run(["rabbitmqctl", "set_permissions", "-p", name, self.user, ".*", ".*", ".*"],
                           check=True, capture_output=True)
            self.method = "rabbitmqctl"
        self.vhost = name
        return f"amqp://{self.user}:{self.password}@{self.host}/{quoted}"

    def delete(self):
        if not self.vhost:
            return
        try:
            if self.method == "api":
                self._api("DELETE", f"/api/vhosts/{urllib.parse.quote(self.vhost, safe='')}")
            else:
                subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], check=True, capture_output=True)
        except Exception as exc:  # noqa: BLE001 - report, never mask the benchmark's own error
            log(f"warning: could not delete vhost {self.vhost}: {exc}")
        self.vhost = None


class Stack:
    """tickets + gateway as `python -m servicekit.run <service>` in a temp dir and own vhost."""

    def __init__(self, args):
        self.args = args
        self.procs = {}
        self.broker = None
        self.tmp = None

    def start(self):
        args = self.args
        self.tmp = tempfile.mkdtemp(prefix="hd-bench-")
        if args.amqp_uri:
            amqp_uri = args.amqp_uri
        else:
            self.broker = Broker(args.management_url, args.amqp_host, "guest", "guest")
            name = f"hd-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            amqp_uri = self.broker.create(name)
            log(f"stack: vhost {name} ({self.broker.method})")
        gateway_port = pick_port(args.gateway_port)
        tickets_port = pick_port(args.tickets_port)
        env = dict(os.environ)
        env.update({
            "AMQP_URI": amqp_uri,
            "HELPDESK_VAR_DIR": self.tmp,
            "HELPDESK_GATEWAY_HTTP_PORT": str(gateway_port),
            "HELPDESK_TICKETS_HTTP_PORT": str(tickets_port),
            "HELPDESK_GATEWAY_RATE_LIMIT_PER_SECOND": "1000000000",
            "HELPDESK_GATEWAY_RATE_LIMIT_BURST": "1000000000",
            "HELPDESK_LOG_LEVEL": args.log_level,
            "PYTHONUNBUFFERED": "1",
        })
        env.pop("HELPDESK_TICKETS_DATABASE_URL", None)
        self.env = env
        subprocess.run([sys.executable, "-m", "servicekit.migrate", "tickets"], cwd=REPO_ROOT, env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for service in ("tickets", "gateway"):
            logfile = open(os.path.join(self.tmp, f"{service}.log"), "wb")
            self.procs[service] = subprocess.Popen(
                [sys.executable, "-m", "servicekit.run", service], cwd=REPO_ROOT, env=env,
                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        base_url = f"http://127.0.0.1:{gateway_port}"
        log(f"stack: tickets pid {self.procs['tickets'].pid} (:{tickets_port}), "
            f"gateway pid {self.procs['gateway'].pid} ({base_url}), var {self.tmp}")
        wait_ready(base_url, self.procs, timeout=60)
        return base_url, amqp_uri, {name: proc.pid for name, proc in self.procs.items()}

    def tail_logs(self, lines=20):
        for service in self.procs:
            path = os.path.join(self.tmp, f"{service}.log")
            try:
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-lines:]
            except OSError:
                continue
            if tail:
                log(f"--- {service} log (last {len(tail)} lines) ---")
                for line in tail:
                    log("  " + line.rstrip())

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.broker:
            self.broker.delete()
        if self.tmp and not self.args.keep_var:
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp:
            log(f"stack: kept {self.tmp}")


def wait_ready(base_url, procs=None, timeout=60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for name, proc in (procs or {}).items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(base_url + "/readyz", timeout=3) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"the stack at {base_url} was not ready after {timeout:.0f}s ({last})")


# --- HTTP load: one OS process per client, http.client over one keep-alive connection -----------

_LOAD_PROCESSES = []  # client processes still running: an interrupted run stops them first


def _as_load_process():
    """Signals in a client: the parent decides when it stops (Ctrl-C reaches the whole group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start_clients(ctx, target, args_for, clients):
    procs = []
    for i in range(clients):
        proc = ctx.Process(target=target, args=args_for(i), daemon=True)
        proc.start()
        procs.append(proc)
        _LOAD_PROCESSES.append(proc)
    return procs


def _collect(procs, results, timeout):
    collected = [results.get(timeout=timeout) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
        if proc in _LOAD_PROCESSES:
            _LOAD_PROCESSES.remove(proc)
    return collected


def stop_load_processes():
    for proc in _LOAD_PROCESSES:
        if proc.is_alive():
            proc.terminate()
    for proc in _LOAD_PROCESSES:
        proc.join(timeout=5)
    _LOAD_PROCESSES.clear()

def _http_client(index, host, port, token, body_prefix, start_at, measure_from, stop_at,
                 fill_total, done, results):
    """Create tickets in a loop. Timed mode: until ``stop_at``. Fill mode (stop_at is None):
    until the shared ``fill_total`` counter reaches its goal (fill_total = (Value, goal))."""
    _as_load_process()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Connection": "keep-alive"}
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies, errors, reconnects = [], {}, 0
    number = 0
    while time.monotonic() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
    cpu_at_measure = None
    while True:
        now = time.monotonic()
        if stop_at is not None:
            if now >= stop_at:
                break
        else:
            counter, goal = fill_total
            with counter.get_lock():
                if counter.value >= goal:
                    break
                counter.value += 1
        if cpu_at_measure is None and now >= measure_from:
            cpu_at_measure = time.process_time()
        number += 1
        body = body_prefix + str(number).encode() + b'"}'
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/tickets", body, headers)
            response = conn.getresponse()
            response.read()
            status = response.status
        except (http.client.HTTPException, OSError) as exc:
            status = type(exc).__name__
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            reconnects += 1
        t1 = time.perf_counter()
        done[index] += 1
        if now >= measure_from and (stop_at is None or time.monotonic() <= stop_at):
            if status == 201:
                latencies.append(t1 - t0)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1
    cpu = time.process_time() - cpu_at_measure if cpu_at_measure is not None else 0.0
    conn.close()
    results.put((index, latencies, errors, cpu, reconnects))


def http_phase(label, base_url, tokens, clients, duration, warmup, progress=True):
    parsed = urllib.parse.urlsplit(base_url)
    host, port = parsed.hostname, parsed.port or 80
    ctx = mp.get_context("fork")
    done = ctx.RawArray("l", clients)
    results = ctx.Queue()
    start_at = time.monotonic() + 0.5
    measure_from = start_at + warmup
    stop_at = measure_from + duration

    def args_for(i):
        prefix = (f'{{"subject": "bench {label} client {i}", "priority": "normal", "tags": ["bench"], '
                  f'"description": "load test ticket ').encode()
        return (i, host, port, tokens[i], prefix, start_at, measure_from, stop_at, None, done, results)

    procs = _start_clients(ctx, _http_client, args_for, clients)
    _watch_progress(label, done, start_at, measure_from, stop_at, procs, progress)
    collected = _collect(procs, results, timeout=60)
    latencies = [x for item in collected for x in item[1]]
    errors = {}
    for item in collected:
        for key, count in item[2].items():
            errors[key] = errors.get(key, 0) + count
    cpu = sum(item[3] for item in collected)
    summary = summarise(latencies, duration, errors, cpu)
    summary["clients"] = clients
    summary["created_total"] = sum(done)
    return summary


def fill_phase(base_url, tokens, clients, goal):
    """Create tickets until ``goal`` more exist (no timing; just volume for the RSS reading)."""
    if goal <= 0:
        return 0
    parsed = urllib.parse.urlsplit(base_url)
    host, port = parsed.hostname, parsed.port or 80
    ctx = mp.get_context("fork")
    done = ctx.RawArray("l", clients)
    counter = ctx.Value("l", 0)
    results = ctx.Queue()
    start_at = time.monotonic() + 0.3

    def args_for(i):
        prefix = f'{{"subject": "bench fill client {i}", "description": "fill ticket '.encode()
        return (i, host, port, tokens[i], prefix, start_at, start_at, None, (counter, goal), done, results)

    procs = _start_clients(ctx, _http_client, args_for, clients)
    last_print = 0.0
    while any(p.is_alive() for p in procs) and results.qsize() < clients:
        time.sleep(0.2)
        if time.monotonic() - last_print >= 1.0:
            last_print = time.monotonic()
            log(f"  [fill] {sum(done):6d}/{goal} created")
    collected = _collect(procs, results, timeout=120)
    errors = sum(sum(item[2].values()) for item in collected)
    if errors:
        log(f"  [fill] {errors} requests failed")
    return sum(len(item[1]) for item in collected)


def _watch_progress(label, done, start_at, measure_from, stop_at, procs, progress):
    last_total, last_t = 0, time.monotonic()
    while any(p.is_alive() for p in procs):
        time.sleep(0.25)
        now = time.monotonic()
        if not progress or now - last_t < 1.0:
            if now > stop_at + 30:
                break
            continue
        total = sum(done)
        rate = (total - last_total) / (now - last_t)
        last_total, last_t = total, now
        if now < measure_from:
            phase = "warm-up"
        elif now < stop_at:
            phase = f"{now - measure_from:4.0f}s/{stop_at - measure_from:.0f}s"
        else:
            phase = "draining"
        log(f"  [{label}] {phase}  {total:6d} requests  {rate:7.1f}/s")


# --- RPC ceiling: a separate eventlet process with one ClusterRpcProxy per caller ---------------

def rpc_worker_main(config_json):
    import warnings

    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops this process
    import eventlet

    eventlet.monkey_patch()
    from nameko.standalone.rpc import ClusterRpcProxy

    cfg = json.loads(config_json)
    callers, duration, warmup = cfg["callers"], cfg["duration"], cfg["warmup"]
    nameko_config = {"AMQP_URI": cfg["amqp_uri"], "serializer": "json"}
    proxies = [ClusterRpcProxy(nameko_config, timeout=30) for _ in range(callers)]
    clients = [p.start() for p in proxies]
    for client in clients:  # connect and declare reply queues before the clock starts
        client.tickets.health_ping()
    counts = [0] * callers
    latencies = [[] for _ in range(callers)]
    errors = [0]
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + duration
    cpu_box = {}

    def caller(i):
        service = clients[i].tickets
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            t0 = time.perf_counter()
            try:
                service.health_ping()
                ok = True
            except Exception:  # noqa: BLE001 - counted, not fatal
                ok = False
            t1 = time.perf_counter()
            counts[i] += 1
            if now >= measure_from and time.monotonic() <= stop_at:
                if ok:
                    latencies[i].append(t1 - t0)
                else:
                    errors[0] += 1

    def reporter():
        last_total, last_t = 0, time.monotonic()
        while time.monotonic() < stop_at:
            eventlet.sleep(1.0)
            now = time.monotonic()
            if "cpu" not in cpu_box and now >= measure_from:
                cpu_box["cpu"] = time.process_time()
            total = sum(counts)
            rate = (total - last_total) / (now - last_t)
            last_total, last_t = total, now
            phase = "warm-up" if now < measure_from else f"{min(now, stop_at) - measure_from:4.0f}s/{duration:.0f}s"
            print(f"  [rpc] {phase}  {total:6d} calls     {rate:7.1f}/s", file=sys.stderr, flush=True)

    pool = eventlet.GreenPool(callers + 1)
    for i in range(callers):
        pool.spawn(caller, i)
    pool.spawn(reporter)
    pool.waitall()
    cpu = time.process_time() - cpu_box.get("cpu", time.process_time())
    for proxy in proxies:
        proxy.stop()
    flat = [x for per in latencies for x in per]
    summary = summarise(flat, duration, {"error": errors[0]} if errors[0] else {}, cpu)
    summary["callers"] = callers
    summary["calls_total"] = sum(counts)
    print(json.dumps(summary))


def rpc_phase(amqp_uri, callers, duration, warmup):
    config = json.dumps({"amqp_uri": amqp_uri, "callers": callers, "duration": duration, "warmup": warmup})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--internal-rpc-worker", config],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, timeout=duration + warmup + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"the RPC load process failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- report ---------------------------------------------------------------------------------------

def median_of(rounds, key):
    values = [r[key] for r in rounds if r.get(key) == r.get(key)]  # drop NaN
    return statistics.median(values) if values else float("nan")


def combine(rounds):
    """Per-round results -> medians over rounds (a single round is itself)."""
    if len(rounds) == 1:
        return dict(rounds[0])
    out = dict(rounds[-1])
    for key in ("per_second", "p50_ms", "p99_ms", "max_ms", "loadgen_cpu_pct"):
        out[key] = median_of(rounds, key)
    out["ok"] = sum(r["ok"] for r in rounds)
    errors = {}
    for r in rounds:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out["errors"] = errors
    for field in ("server_cpu_pct", "server_cpu_ms_per_op"):
        out[field] = {name: statistics.median(r.get(field, {}).get(name, 0.0) for r in rounds)
                      for name in rounds[-1].get(field, {})}
    return out


def fmt_row(name, r, unit):
    cpu = r.get("server_cpu_pct") or {}
    per_op = r.get("server_cpu_ms_per_op") or {}
    cpu_text = "  ".join(f"{k} {v:3.0f}% ({per_op.get(k, 0):.2f} ms/op)" for k, v in cpu.items())
    errors = sum(r["errors"].values())
    return (f"  {name:<16} {r['per_second']:7.1f} {unit:<7} p50 {r['p50_ms']:6.1f} ms  "
            f"p99 {r['p99_ms']:6.1f} ms  errors {errors:<3d}| cpu: {cpu_text}  loadgen {r['loadgen_cpu_pct']:.0f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase (default 10)")
    parser.add_argument("--rpc-duration", type=float, help="measured seconds of the RPC phase (default --duration)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase (default 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat rpc/create1/createN this many times and report medians (default 1)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent callers/clients (default 10)")
    parser.add_argument("--fill", type=int, default=10000,
                        help="tickets this run creates in total before reading RSS (default 10000; 0 skips)")
    parser.add_argument("--phases", default="rpc,create1,createN,fill",
                        help="comma-separated subset of rpc,create1,createN,fill")
    parser.add_argument("--base-url", help="use a running gateway instead of starting a stack")
    parser.add_argument("--amqp-uri", help="broker (with vhost) of the running stack, or for the started one")
    parser.add_argument("--gateway-pid", type=int, help="pid of the running gateway (default: by port)")
    parser.add_argument("--tickets-pid", type=int, help="pid of the running tickets (default: by --tickets-port)")
    parser.add_argument("--gateway-port", type=int, default=18000, help="started stack: gateway port (default 18000)")
    parser.add_argument("--tickets-port", type=int, default=19101,
                        help="started stack: tickets port (default 19101); with --base-url: where to find its pid")
    parser.add_argument("--amqp-host", default="localhost:5672", help="started stack: broker host:port")
    parser.add_argument("--management-url", default="http://localhost:15672",
                        help="RabbitMQ management API used to create the throwaway vhost")
    parser.add_argument("--log-level", default="WARNING", help="started stack: HELPDESK_LOG_LEVEL")
    parser.add_argument("--keep-var", action="store_true", help="keep the started stack's temp dir (db, logs)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="keep the started stack up this many seconds after setup (attach a profiler)")
    args = parser.parse_args(argv)

    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = phases - {"rpc", "create1", "createN", "fill"}
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if args.base_url and not args.amqp_uri and "rpc" in phases:
        parser.error("--base-url needs --amqp-uri for the rpc phase (or leave rpc out of --phases)")

    sys.path.insert(0, REPO_ROOT)
    from gateway.auth import mint_token

    run_id = uuid.uuid4().hex[:8]
    tokens = [mint_token(f"bench-{run_id}-{i}", "requester", org="bench-org") for i in range(max(args.clients, 1))]
    rpc_duration = args.rpc_duration or args.duration

    def _terminate(signum, _frame):  # a plain `kill` still stops the stack and drops the vhost
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # also when started in the background (SIGINT ignored)
    log(f"benchmark: load average {load_average()} on {os.cpu_count()} cpus")
    stack = None
    results = {"load_average_start": load_average(), "cpus": os.cpu_count(), "rounds": args.rounds,
               "duration_s": args.duration, "clients": args.clients}
    interrupted = False
    try:
        if args.base_url:
            base_url, amqp_uri = args.base_url.rstrip("/"), args.amqp_uri
            gw_port = urllib.parse.urlsplit(base_url).port or 80
            pids = {"gateway": args.gateway_pid or _one(pids_listening_on(gw_port), "gateway"),
                    "tickets": args.tickets_pid or _one(pids_listening_on(args.tickets_port), "tickets")}
            wait_ready(base_url, timeout=10)
        else:
            stack = Stack(args)
            base_url, amqp_uri, pids = stack.start()
        results["pids"] = pids
        if args.hold:
            log(f"holding {args.hold:.0f}s: gateway pid {pids['gateway']}, tickets pid {pids['tickets']}")
            time.sleep(args.hold)
        watch = CpuWatch({**pids, "broker": broker_pid()})
        created = 0
        per_round = {"rpc": [], "create1": [], "createN": []}
        for round_no in range(1, args.rounds + 1):
            if args.rounds > 1:
                log(f"round {round_no}/{args.rounds}  (load average {load_average()})")
            if "rpc" in phases:
                log(f"phase rpc: tickets.health_ping, {args.clients} callers, {rpc_duration:.0f}s")
                watch.start()
                r = rpc_phase(amqp_uri, args.clients, rpc_duration, args.warmup)
                watch.stop(r, r["calls_total"])
                per_round["rpc"].append(r)
            if "create1" in phases:
                log(f"phase create1: POST /v1/tickets, 1 client, {args.duration:.0f}s")
                watch.start()
                r = http_phase("create1", base_url, tokens, 1, args.duration, args.warmup)
                watch.stop(r, r["created_total"])
                created += r["created_total"]
                per_round["create1"].append(r)
            if "createN" in phases:
                log(f"phase createN: POST /v1/tickets, {args.clients} clients, {args.duration:.0f}s")
                watch.start()
                r = http_phase(f"create{args.clients}", base_url, tokens, args.clients, args.duration, args.warmup)
                watch.stop(r, r["created_total"])
                created += r["created_total"]
                per_round["createN"].append(r)
        for key, rounds in per_round.items():
            if rounds:
                results[key] = combine(rounds)
                results[key]["rounds_detail"] = rounds
        if "fill" in phases:
            remaining = max(0, args.fill - created)
            log(f"phase fill: {created} tickets so far, creating {remaining} more ({args.clients} clients)")
            created += fill_phase(base_url, tokens, args.clients, remaining)
            time.sleep(1.0)  # let the outbox relay catch up before reading memory
            results["rss_mb"] = {name: rss_mb(pid) for name, pid in pids.items()}
            results["tickets_created"] = created
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted")
    except Exception as exc:  # noqa: BLE001
        log(f"benchmark failed: {exc}")
        if stack:
            stack.tail_logs()
        results["error"] = str(exc)
    finally:
        stop_load_processes()
        if stack:
            stack.stop()
    results["load_average_end"] = load_average()
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 130 if interrupted else 0


def _one(pids, name):
    if len(pids) == 1:
        return next(iter(pids))
    if pids:
        log(f"warning: several processes listen on the {name} port ({sorted(pids)}); pass --{name}-pid")
    else:
        log(f"warning: found no {name} process by port; pass --{name}-pid for its CPU and RSS")
    return None


def report(results, args):
    out = sys.stdout
    print("", file=out)
    print(f"=== help desk benchmark ({results['cpus']} cpus, load average {results['load_average_start']} "
          f"-> {results['load_average_end']}; {args.duration:.0f}s phases, {args.rounds} round(s), "
          f"{'median of rounds' if args.rounds > 1 else 'single round'}) ===", file=out)
    rpc, c1, cn = results.get("rpc"), results.get("create1"), results.get("createN")
    if rpc:
        print(fmt_row(f"rpc ceiling x{rpc['callers']}", rpc, "calls/s"), file=out)
    if c1:
        print(fmt_row("create x1", c1, "req/s"), file=out)
    if cn:
        print(fmt_row(f"create x{cn['clients']}", cn, "req/s"), file=out)
    rss = results.get("rss_mb")
    if rss:
        print(f"  rss after {results.get('tickets_created', 0)} tickets created: " + "  ".join(
            f"{k} {v:.1f} MB" if v is not None else f"{k} ?" for k, v in rss.items()), file=out)
    print("", file=out)
    if rpc and cn and rpc["per_second"] > 0:
        ratio = cn["per_second"] / rpc["per_second"]
        results["ratio"] = ratio
        print(f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'} ratio create@{cn['clients']} / rpc ceiling = "
              f"{cn['per_second']:.1f} / {rpc['per_second']:.1f} = {ratio:.2f} (target >= {TARGET_RATIO})", file=out)
    if cn:
        p99 = cn["p99_ms"]
        print(f"{'PASS' if p99 <= TARGET_P99_MS else 'FAIL'} create@{cn['clients']} p99 = {p99:.1f} ms "
              f"(target <= {TARGET_P99_MS:.0f} ms)", file=out)
        errors = sum(cn["errors"].values()) + (sum(c1["errors"].values()) if c1 else 0)
        if errors:
            print(f"NOTE {errors} create requests failed: {cn['errors']}", file=out)
    if rss:
        for name, value in rss.items():
            if value is None:
                print(f"SKIP rss {name}: process unknown", file=out)
            else:
                print(f"{'PASS' if value < TARGET_RSS_MB else 'FAIL'} rss {name} = {value:.1f} MB after "
                      f"{results.get('tickets_created', 0)} tickets (target < {TARGET_RSS_MB:.0f} MB)", file=out)
    if results.get("error"):
        print(f"ERROR {results['error']}", file=out)
    out.flush()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--internal-rpc-worker":
        rpc_worker_main(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
