#!/usr/bin/env bash
# Builds and installs Portcullis, starts the demo's upstreams (PostgreSQL,
# sshd, nginx with HTTPS), and runs two agents tagged with different
# identities. Used by the Vagrantfile; also runs unchanged on a plain
# Debian 12 host:
#   - with Docker: the agents are containers, tagged with
#     `portcullis tag --container ID`;
#   - without Docker: the agents are plain processes in cgroups this script
#     makes (/sys/fs/cgroup/portcullis-demo/...), tagged by path;
#   - with systemd as PID 1: the daemon runs as the installed
#     portcullis.service; without: it is started in the background.
#
# Usage (as root, from anywhere):
#   vagrant/provision.sh          # set up (idempotent: run it again freely)
#   vagrant/provision.sh status   # what runs, what the agents saw
#   vagrant/provision.sh down     # stop and remove everything it started
#
# Environment:
#   PORTCULLIS_BIN=PATH   use this binary instead of building one
#   PORTCULLIS_SRC=DIR    the source tree (default: this script's parent)
set -euo pipefail

SRC=${PORTCULLIS_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DEMO=/var/lib/portcullis-demo
CG_MOUNT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
CG_DEMO=portcullis-demo          # agents' cgroups without Docker, under CG_MOUNT
PG_PORT=15432 SSH_PORT=10022 HTTPS_PORT=18443 HTTP_PORT=18080
AGENT_IMAGE=debian:12-slim
AGENTS="billing ops"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'provision: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
systemd_pid1() { [ -d /run/systemd/system ]; }
docker_ok() { have docker && docker info >/dev/null 2>&1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
b64url() { basenc --base64url -w0 | tr -d '='; }

[ "$(id -u)" = 0 ] || die "run as root"
[ -n "$CG_MOUNT" ] || die "no cgroup2 mount"

# --------------------------------------------------------------- build ----
build() {
    if [ -n "${PORTCULLIS_BIN:-}" ]; then
        BIN=$PORTCULLIS_BIN
        [ -x "$BIN" ] || die "PORTCULLIS_BIN=$BIN is not executable"
        log "using $BIN"
        return
    fi
    export PATH="$HOME/.cargo/bin:$PATH"
    if ! have cargo; then
        log "installing Rust (rustup)"
        have curl || { apt-get update -q && apt-get install -y -q curl ca-certificates; }
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    fi
    rustup toolchain list | grep -q '^nightly' ||
        rustup toolchain install nightly --profile minimal --component rust-src
    log "cargo xtask setup (packages, bpf-linker; idempotent)"
    (cd "$SRC" && cargo xtask setup)
    log "building portcullis (release)"
    (cd "$SRC" && cargo build --release -p gateway-user)
    BIN=$SRC/target/release/portcullis
}

# ------------------------------------------------------------- install ----
install_portcullis() {
    log "portcullis install"
    "$BIN" install
    # 0711: the postgres user and nginx's workers traverse it to their own
    # subdirectories; everything secret is in 0700 subdirectories.
    install -d -m 0711 "$DEMO"
    install -d -m 0700 "$DEMO/secrets" "$DEMO/issuer" "$DEMO/tokens" "$DEMO/run"
}

# -------------------------------------------------------------- issuer ----
# A demo OIDC issuer: an RSA key, its JWKS, and an RS256 token per agent
# (what a Kubernetes projected service-account token would be).
issuer() {
    local d=$DEMO/issuer
    if [ ! -f "$d/key.pem" ]; then
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$d/key.pem" 2>/dev/null
        chmod 600 "$d/key.pem"
    fi
    local n e
    n=$(openssl rsa -in "$d/key.pem" -noout -modulus | cut -d= -f2 | basenc --base16 -d | b64url)
    e=$(printf '\x01\x00\x01' | b64url)
    printf '{"keys":[{"kty":"RSA","kid":"vm-demo","alg":"RS256","use":"sig","n":"%s","e":"%s"}]}\n' \
        "$n" "$e" >"$d/jwks.json"
    local now exp
    now=$(date +%s) exp=$(($(date +%s) + 30 * 86400))
    for a in $AGENTS; do
        local header payload sig
        header=$(printf '{"alg":"RS256","typ":"JWT","kid":"vm-demo"}' | b64url)
        payload=$(printf '{"iss":"https://issuer.vm.portcullis.demo","aud":"portcullis","sub":"system:serviceaccount:agents:%s","iat":%d,"nbf":%d,"exp":%d}' \
            "$a" "$now" "$((now - 60))" "$exp" | b64url)
        sig=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -sign "$d/key.pem" -binary | b64url)
        printf '%s.%s.%s' "$header" "$payload" "$sig" >"$DEMO/tokens/$a.jwt.tmp"
        mv "$DEMO/tokens/$a.jwt.tmp" "$DEMO/tokens/$a.jwt"
    done
}

# ----------------------------------------------------------- upstreams ----
postgres() {
    local pgbin
    pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -n "$pgbin" ] || die "PostgreSQL is not installed (cargo xtask setup installs it)"
    local data=$DEMO/pg sock=$DEMO/pg-run
    install -d -o postgres -g postgres -m 0700 "$data" "$sock"
    [ -f "$DEMO/secrets/orders.pw" ] || { openssl rand -hex 16 >"$DEMO/secrets/orders.pw"; chmod 600 "$DEMO/secrets/orders.pw"; }
    if [ ! -f "$data/PG_VERSION" ]; then
        log "PostgreSQL: initdb $data (127.0.0.1:$PG_PORT)"
        openssl rand -hex 16 >"$sock/initpw"
        chown postgres "$sock/initpw"
        runuser -u postgres -- "$pgbin/initdb" -D "$data" -A scram-sha-256 -U postgres \
            --pwfile="$sock/initpw" >/dev/null
        rm -f "$sock/initpw"
        cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$sock'
EOF
        echo "local all postgres peer" >"$data/pg_hba.conf"
        echo "host all all 127.0.0.1/32 scram-sha-256" >>"$data/pg_hba.conf"
    fi
    if ! runuser -u postgres -- "$pgbin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "PostgreSQL: start"
        runuser -u postgres -- "$pgbin/pg_ctl" -D "$data" -l "$sock/pg.log" -w start >/dev/null
    fi
    local pw
    pw=$(cat "$DEMO/secrets/orders.pw")
    runuser -u postgres -- psql -h "$sock" -p "$PG_PORT" -q -v ON_ERROR_STOP=1 -d postgres <<EOF
SELECT 'CREATE DATABASE orders' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'orders')\gexec
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_ro') THEN CREATE ROLE agent_ro LOGIN; END IF;
END \$\$;
ALTER ROLE agent_ro PASSWORD '$pw';
EOF
    runuser -u postgres -- psql -h "$sock" -p "$PG_PORT" -q -v ON_ERROR_STOP=1 -d orders <<'EOF'
CREATE TABLE IF NOT EXISTS customers (id int PRIMARY KEY, name text, email text, card_number text);
INSERT INTO customers VALUES
  (1, 'Ada', 'ada@example.com', '4111 1111 1111 1111'),
  (2, 'Grace', 'grace@example.com', '5500 0000 0000 0004')
ON CONFLICT DO NOTHING;
GRANT SELECT, INSERT, UPDATE, DELETE ON customers TO agent_ro;
EOF
}

sshd_up() {
    local d=$DEMO/ssh
    install -d -m 0700 "$d"
    if ! id pcdemo >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash --comment "Portcullis demo build host user" pcdemo
        # '*': no password, but not locked ('!'), so key logins work.
        usermod -p '*' pcdemo
    fi
    [ -f "$d/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$d/host_ed25519"
    [ -f "$DEMO/secrets/deploy_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C portcullis-demo -f "$DEMO/secrets/deploy_ed25519"
    install -d -o pcdemo -g pcdemo -m 0700 /home/pcdemo/.ssh
    install -o pcdemo -g pcdemo -m 0600 "$DEMO/secrets/deploy_ed25519.pub" /home/pcdemo/.ssh/authorized_keys
    echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1-2 "$d/host_ed25519.pub")" >"$d/known_hosts"
    cat >"$d/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $d/host_ed25519
PidFile $DEMO/run/sshd.pid
AllowUsers pcdemo
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
Subsystem sftp internal-sftp
EOF
    install -d -m 0755 /run/sshd
    if ! alive "$DEMO/run/sshd.pid"; then
        log "sshd: start (127.0.0.1:$SSH_PORT, user pcdemo)"
        /usr/sbin/sshd -f "$d/sshd_config"
    fi
}

nginx_up() {
    local d=$DEMO/tls
    install -d -m 0700 "$d"
    if [ ! -f "$d/server.crt" ]; then
        log "TLS: a demo CA and a server certificate for the billing API"
        openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=Portcullis demo CA" \
            -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=billing.internal" \
            -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
        printf 'subjectAltName=DNS:billing.internal,IP:127.0.0.1,IP:192.0.2.12\n' >"$d/ext"
        openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
            -days 365 -extfile "$d/ext" -out "$d/server.crt" 2>/dev/null
    fi
    [ -f "$DEMO/secrets/api.token" ] || { openssl rand -hex 24 >"$DEMO/secrets/api.token"; chmod 600 "$DEMO/secrets/api.token"; }
    install -d -m 0755 "$DEMO/www/v1"
    echo "<h1>Portcullis demo: you reached the web page</h1>" >"$DEMO/www/index.html"
    echo '{"invoices":[{"id":1,"customer":{"email":"ada@example.com"},"total":42}]}' >"$DEMO/www/v1/invoices"
    chmod -R a+rX "$DEMO/www"
    cat >"$DEMO/nginx.conf" <<EOF
worker_processes 1;
pid $DEMO/run/nginx.pid;
error_log $DEMO/nginx-error.log;
events { worker_connections 64; }
http {
    access_log $DEMO/nginx-access.log;
    default_type application/json;
    server {
        listen 127.0.0.1:$HTTP_PORT;
        root $DEMO/www;
    }
    server {
        listen 127.0.0.1:$HTTPS_PORT ssl;
        ssl_certificate $d/server.crt;
        ssl_certificate_key $d/server.key;
        root $DEMO/www;
    }
}
EOF
    if alive "$DEMO/run/nginx.pid"; then
        nginx -c "$DEMO/nginx.conf" -s reload
    else
        log "nginx: start (HTTP 127.0.0.1:$HTTP_PORT, HTTPS 127.0.0.1:$HTTPS_PORT)"
        nginx -c "$DEMO/nginx.conf"
    fi
}

# -------------------------------------------------------------- daemon ----
daemon_up() {
    install -m 0640 "$SRC/vagrant/policies/vm.toml" "$SRC/vagrant/policies/vm.cedar" /etc/portcullis/policies/
    "$BIN" policy check /etc/portcullis/policies
    if systemd_pid1; then
        log "daemon: systemctl enable --now portcullis"
        systemctl enable --now portcullis
        systemctl reload portcullis || true
    elif "$BIN" status >/dev/null 2>&1; then
        log "daemon: already running; reloading policies"
        "$BIN" policy reload
    else
        log "daemon: no systemd, starting it in the background (log: /var/log/portcullis.log)"
        setsid /usr/local/bin/portcullis daemon >>/var/log/portcullis.log 2>&1 </dev/null &
        echo $! >"$DEMO/run/daemon.pid"
    fi
    for _ in $(seq 1 100); do
        "$BIN" status >/dev/null 2>&1 && break
        sleep 0.2
    done
    "$BIN" status
}

# -------------------------------------------------------------- agents ----
# Each agent tries every resource every 10 s and logs what happened, with
# bash's /dev/tcp only (nothing to install in the image).
AGENT_SCRIPT='
try() { # name host port request
  if out=$(timeout 5 bash -c "exec 3<>/dev/tcp/$2/$3; printf \"$4\" >&3; head -c 200 <&3" 2>&1) && [ -n "$out" ]; then
    echo "$(date +%T) $1: connected, got: $(echo "$out" | head -1 | tr -d "\r")"
  else
    echo "$(date +%T) $1: refused or closed (${out:-no data})"
  fi
}
sleep 3
while :; do
  try web 192.0.2.13 80 "GET / HTTP/1.0\r\nHost: web\r\n\r\n"
  try orders-db 192.0.2.10 5432 ""
  try build-host 192.0.2.11 22 ""
  sleep 10
done'

agents_up() {
    if docker_ok; then
        for a in $AGENTS; do
            local name=portcullis-agent-$a id
            if [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
                docker rm -f "$name" >/dev/null 2>&1 || true
                log "agent $a: docker run $AGENT_IMAGE"
                docker run -d --name "$name" "$AGENT_IMAGE" bash -c "$AGENT_SCRIPT" >/dev/null
            fi
            id=$(docker inspect -f '{{.Id}}' "$name")
            log "agent $a: portcullis tag --container ${id:0:12} --identity vm-$a"
            "$BIN" tag --container "${id:0:12}" --identity "vm-$a" --token-file "$DEMO/tokens/$a.jwt"
        done
    else
        for a in $AGENTS; do
            local cg=$CG_MOUNT/$CG_DEMO/agent-$a pidf=$DEMO/run/agent-$a.pid
            mkdir -p "$cg"
            if ! alive "$pidf"; then
                log "agent $a: no Docker; a plain process in cgroup /$CG_DEMO/agent-$a"
                # The child joins the cgroup before it execs the agent.
                setsid bash -c "echo \$\$ > $cg/cgroup.procs; exec bash -c '$AGENT_SCRIPT'" \
                    >"$DEMO/agent-$a.log" 2>&1 </dev/null &
                echo $! >"$pidf"
            fi
            log "agent $a: portcullis tag /$CG_DEMO/agent-$a --identity vm-$a"
            "$BIN" tag "/$CG_DEMO/agent-$a" --identity "vm-$a" --token-file "$DEMO/tokens/$a.jwt"
        done
    fi
}

status() {
    BIN=${PORTCULLIS_BIN:-/usr/local/bin/portcullis}
    "$BIN" status || true
    echo; "$BIN" tags || true
    echo; "$BIN" flows || true
    for a in $AGENTS; do
        echo; echo "--- agent $a (last lines) ---"
        if docker_ok && docker inspect "portcullis-agent-$a" >/dev/null 2>&1; then
            docker logs --tail 6 "portcullis-agent-$a" 2>&1
        else
            tail -n 6 "$DEMO/agent-$a.log" 2>/dev/null || echo "(no log)"
        fi
    done
    echo; echo "--- metrics (excerpt) ---"
    curl -s http://127.0.0.1:15020/metrics | grep -E '^portcullis_(flows|decisions|tags|ready)' || true
}

down() {
    BIN=${PORTCULLIS_BIN:-/usr/local/bin/portcullis}
    log "stopping agents"
    if docker_ok; then
        for a in $AGENTS; do docker rm -f "portcullis-agent-$a" >/dev/null 2>&1 || true; done
    fi
    for a in $AGENTS; do
        alive "$DEMO/run/agent-$a.pid" && kill "$(cat "$DEMO/run/agent-$a.pid")" 2>/dev/null || true
        [ -d "$CG_MOUNT/$CG_DEMO/agent-$a" ] && { echo 1 >"$CG_MOUNT/$CG_DEMO/agent-$a/cgroup.kill" 2>/dev/null || true; }
    done
    sleep 0.5
    for a in $AGENTS; do rmdir "$CG_MOUNT/$CG_DEMO/agent-$a" 2>/dev/null || true; done
    rmdir "$CG_MOUNT/$CG_DEMO" 2>/dev/null || true
    log "uninstalling portcullis (stops the daemon, detaches, --purge)"
    [ -x "$BIN" ] && "$BIN" uninstall --purge || true
    alive "$DEMO/run/daemon.pid" && kill "$(cat "$DEMO/run/daemon.pid")" 2>/dev/null || true
    log "stopping upstreams"
    alive "$DEMO/run/nginx.pid" && nginx -c "$DEMO/nginx.conf" -s quit || true
    alive "$DEMO/run/sshd.pid" && kill "$(cat "$DEMO/run/sshd.pid")" || true
    local pgbin
    pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -f "$DEMO/pg/PG_VERSION" ] && runuser -u postgres -- "$pgbin/pg_ctl" -D "$DEMO/pg" -m fast -w stop >/dev/null 2>&1 || true
    id pcdemo >/dev/null 2>&1 && userdel -r pcdemo 2>/dev/null || true
    rm -rf "$DEMO" /var/log/portcullis.log
    log "down"
}

case "${1:-up}" in
    up)
        build
        install_portcullis
        issuer
        postgres
        sshd_up
        nginx_up
        daemon_up
        agents_up
        log "done. Watch: $0 status   (agents retry every 10 s)"
        ;;
    status) status ;;
    down) down ;;
    *) die "usage: $0 [up|status|down]" ;;
esac
