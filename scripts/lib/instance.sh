# shellcheck shell=bash
# Shared by the scripts that run a seckill of their own (bench, fuzz-api, soak): its own
# database, Redis key prefix and queues, development mode on loopback ports; every process it
# starts is stopped by pid, and everything it created is removed, when the script exits.
#
#   source scripts/lib/instance.sh
#   instance_init TAG          # exports the SECKILL_* settings; sets $bin, $http_port, $admin_port,
#                              # $worker_port (a `seckill worker`'s own listener)
#   instance_start LOG ROLE    # starts `seckill ROLE` in the background (pid kept)
#   instance_wait_ready PORT   # until /readyz answers 200 (fails after 30 s)
#   admin METHOD PATH [JSON]   # the operators' API with the development admin token
#   dev_jwt USER               # a shopper's JWT from `seckill dev-token`
#   sold_out_wrk NAME LUA      # a sold-out product's purchase URL, and LUA: a wrk script that
#                              # buys it with one shopper's JWT and purchase token

instance_pids=()

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# instance_init TAG [PROFILE]: PROFILE is debug (default) or release; builds the binary.
instance_init() {
    instance_tag=$1
    local profile=${2:-debug} target=${CARGO_TARGET_DIR:-target}
    if [ "$profile" = release ]; then
        cargo build --release --quiet --bin seckill
    else
        # With the tests, so the dependencies keep the features the test suite unified
        # (dev-dependencies included): the binary scripts/test built is reused as it is, instead
        # of rebuilding some 50 crates into a second copy on disk.
        cargo build --quiet --bin seckill --tests
    fi
    bin="$target/$profile/seckill"
    http_port=$(free_port)
    admin_port=$(free_port)
    worker_port=$(free_port)
    export SECKILL_DEV=1 RUST_LOG="${RUST_LOG:-warn}" SECKILL_LOG_FORMAT=json \
        SECKILL_DATABASE_URL="postgres://postgres@127.0.0.1:5432/seckill_$instance_tag" \
        SECKILL_REDIS_PREFIX="$instance_tag" SECKILL_AMQP_QUEUE="$instance_tag.orders" \
        SECKILL_HTTP_ADDR="127.0.0.1:$http_port" SECKILL_ADMIN_ADDR="127.0.0.1:$admin_port" \
        SECKILL_WORKER_ADDR="127.0.0.1:$worker_port"
    trap instance_cleanup EXIT
}

instance_start() { # LOG ROLE [ENV=VALUE...]
    local log=$1 role=$2
    shift 2
    env "$@" "$bin" "$role" >"$log" 2>&1 &
    instance_pids+=($!)
}

instance_wait_ready() { # PORT
    local _
    for _ in $(seq 1 300); do
        curl -fs -o /dev/null "http://127.0.0.1:$1/readyz" && return 0
        sleep 0.1
    done
    echo "seckill on port $1 did not become ready" >&2
    return 1
}

instance_cleanup() {
    local pid
    for pid in "${instance_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${instance_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    psql -q -h 127.0.0.1 -U postgres -d postgres \
        -c "drop database if exists seckill_$instance_tag with (force)" >/dev/null 2>&1 || true
    redis-cli --scan --pattern "$instance_tag:*" | xargs -r -n 500 redis-cli del >/dev/null || true
    local q
    for q in "$instance_tag.orders" "$instance_tag.orders.dlq"; do
        rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
    done
}

admin() { # METHOD PATH [JSON]
    local args=(-fsS -X "$1" -H "authorization: Bearer seckill-dev-admin-token")
    if [ $# -ge 3 ]; then args+=(-H 'content-type: application/json' -d "$3"); fi
    curl "${args[@]}" "http://127.0.0.1:$admin_port$2"
}

# admin_create_product NAME STOCK STARTS_IN ENDS_IN: the new product's id (offsets like "-1 min").
admin_create_product() {
    local body
    body=$(printf '{"name":"%s","stock":%d,"price_cents":100,"starts_at":"%s","ends_at":"%s"}' \
        "$1" "$2" "$(date -u -d "$3" +%FT%TZ)" "$(date -u -d "$4" +%FT%TZ)")
    admin POST /api/v1/admin/products "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["product_id"])'
}

dev_jwt() { # USER
    "$bin" dev-token --user "$1"
}

# sold_out_wrk NAME LUA: creates and preheats a product with no stock, makes one shopper's first
# attempt (decided by the script: 410; every later one is answered from memory, and anything
# else fails), writes LUA, a wrk script that repeats that purchase, and prints its URL.
sold_out_wrk() {
    local product jwt token first url
    product=$(admin_create_product "$1" 0 '-1 min' '+1 hour')
    admin POST "/api/v1/admin/products/$product/preheat" >/dev/null
    url="http://127.0.0.1:$http_port/api/v1/products/$product"
    jwt=$(dev_jwt 424242)
    token=$(curl -fsS -X POST -H "authorization: Bearer $jwt" "$url/token" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    first=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "authorization: Bearer $jwt" \
        -H 'content-type: application/json' -d "{\"token\":\"$token\"}" "$url/reservations")
    if [ "$first" != 410 ]; then
        echo "FAIL: the first purchase of a sold-out product answered $first, not 410" >&2
        return 1
    fi
    printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer %s"\n' \
        "'{\"token\":\"$token\"}'" "$jwt" >"$2"
    echo "$url/reservations"
}
