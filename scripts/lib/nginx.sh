# shellcheck shell=bash
# nginx on loopback in front of seckill, with the micro-cache deploy/nginx.conf uses
# (deploy/nginx/cache-http.conf and cache-locations.conf, included as they are).
#
#   source scripts/lib/nginx.sh
#   nginx_ensure                         # Debian's nginx-light, installed if missing (root or
#                                        # passwordless sudo); never left running as a service
#   nginx_loopback_conf DIR PORT UPSTREAM...  # writes DIR/nginx.conf: listen 127.0.0.1:PORT,
#                                        # the cacheable routes cached, the rest passed through
#   nginx_start DIR                      # runs it in the foreground of a background job; sets
#                                        # $nginx_pid (stop it with nginx_stop)
#   nginx_stop                           # stops the nginx nginx_start started, by pid

nginx_ensure() {
    command -v nginx >/dev/null 2>&1 && return 0
    local sudo=() policy=/usr/sbin/policy-rc.d made_policy=0
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "nginx is missing and cannot be installed here (needs root or passwordless sudo): run 'apt-get install -y --no-install-recommends nginx-light' as root" >&2
            return 1
        fi
    fi
    echo "installing nginx (Debian's nginx-light)"
    # The package would start a system nginx on port 80: a policy that refuses it, for the
    # length of the install only (one the machine already has is left as it is).
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        made_policy=1
    fi
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light)
    local rc=0
    "${sudo[@]}" "${install[@]}" >/dev/null ||
        { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" "${install[@]}" >/dev/null; } || rc=$?
    [ "$made_policy" -eq 0 ] || "${sudo[@]}" rm -f "$policy"
    [ "$rc" -eq 0 ] || { echo "apt-get install nginx-light failed" >&2; return 1; }
}

nginx_loopback_conf() { # DIR PORT UPSTREAM...
    local dir port=$2 deploy
    mkdir -p "$1/logs" "$1/cache"
    dir=$(cd "$1" && pwd) # nginx takes these paths from its prefix otherwise
    shift 2
    deploy="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../deploy/nginx" && pwd)"
    {
        echo "# Written by scripts/lib/nginx.sh: seckill on loopback behind nginx's micro-cache."
        echo "daemon off;"
        # Workers as this user: the default (nobody) may not reach a checkout under a private
        # directory (a 0700 mktemp -d), and the cache then fails with a 500. Without root the
        # directive is ignored.
        if [ "$(id -u)" -eq 0 ]; then echo "user $(id -un) $(id -gn);"; fi
        echo "pid $dir/nginx.pid;"
        echo "error_log $dir/logs/error.log warn;"
        echo "worker_processes 1;"
        echo "events { worker_connections 16384; }"
        echo "http {"
        echo "    access_log off;"
        echo "    keepalive_timeout 30s;"
        echo "    keepalive_requests 100000;"
        echo "    client_body_temp_path $dir/tmp-body;"
        echo "    proxy_temp_path $dir/tmp-proxy;"
        echo "    proxy_http_version 1.1;"
        echo "    proxy_set_header Connection \"\";"
        echo "    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;"
        echo "    include $deploy/cache-http.conf;"
        echo "    upstream shoppers {"
        local u
        for u in "$@"; do echo "        server $u;"; done
        echo "        keepalive 64;"
        echo "    }"
        echo "    server {"
        echo "        listen 127.0.0.1:$port;"
        echo "        include $deploy/cache-locations.conf;"
        echo "        location / {"
        echo "            proxy_pass http://shoppers;"
        echo "            proxy_buffering off;"
        echo "            proxy_read_timeout 1h;"
        echo "        }"
        echo "    }"
        echo "}"
    } >"$dir/nginx.conf"
}

nginx_pid=""

nginx_start() { # DIR
    local dir
    dir=$(cd "$1" && pwd)
    nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/logs/error.log" &
    nginx_pid=$!
}

nginx_stop() {
    [ -n "$nginx_pid" ] || return 0
    kill "$nginx_pid" 2>/dev/null || true
    wait "$nginx_pid" 2>/dev/null || true
    nginx_pid=""
}
