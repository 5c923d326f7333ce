# shellcheck shell=bash
# CPU time (user + system, /proc/<pid>/stat) of every process around a run, by role — the two
# cores here are shared by the server, the client, Redis, RabbitMQ and Postgres, so a figure
# says what the others took meanwhile. Used by scripts/bench and scripts/bench-sale.
#
#   cpu_snap FILE                        "pid comm ticks" of every process, now
#   cpu_by_role BEFORE AFTER SERVE WORKER [REDIS]
#                                        "role seconds" lines between two snapshots: serve,
#                                        worker (those pids), redis, rabbitmq, postgres, other;
#                                        a process started in between counts from zero. REDIS:
#                                        the pid that alone is "redis" (else every redis-server)
#   children_cpu VAR                     seconds of CPU this shell's finished children took
#                                        (bash `times`; needs $raw for a scratch file)

cpu_snap() { # FILE
    python3 -c '
import glob
for path in glob.glob("/proc/[0-9]*/stat"):
    try:
        stat = open(path).read()
    except OSError:
        continue
    comm = stat[stat.index("(") + 1:stat.rindex(")")].replace(" ", "")
    fields = stat[stat.rindex(")") + 2:].split()
    print(path.split("/")[2], comm, int(fields[11]) + int(fields[12]))
' >"$1"
}

cpu_by_role() { # BEFORE AFTER SERVE WORKER [REDIS]
    awk -v hz="$(getconf CLK_TCK)" -v serve="$3" -v worker="$4" -v redis="${5:-}" '
    NR == FNR { before[$1] = $3; next }
    { d = ($3 - before[$1]) / hz; if (d <= 0) next
      n = $2
      if ($1 == serve) n = "serve"; else if ($1 == worker) n = "worker"
      else if (n == "redis-server") n = (redis == "" || $1 == redis) ? "redis" : "other"
      else if (n == "beam.smp") n = "rabbitmq"
      else if (n != "postgres") n = "other"
      t[n] += d }
    END { for (k in t) printf "%s %.2f\n", k, t[k] }' "$1" "$2"
}

children_cpu() { # VAR: seconds of CPU the script's finished children took (bash's `times`,
    # run in this shell: in a $(…) it would count the subshell's children only)
    times >"$raw/.times"
    printf -v "$1" '%s' "$(tail -1 "$raw/.times" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } printf "%.2f", t }')"
}
