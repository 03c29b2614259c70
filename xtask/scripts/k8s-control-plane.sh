#!/bin/bash
# Start a local control plane: etcd + kube-apiserver (+ optionally kube-controller-manager, kube-scheduler).
# No containers, no network beyond 127.0.0.1.
#   envtest-up.sh start   -> prints export lines (KUBECONFIG, K8S_TOKEN ...)
#   envtest-up.sh stop
# Env knobs: K8S_PREFIX (setup.sh output dir), BIN_DIR (kube-apiserver etc.), ETCD (etcd binary), RUN_DIR, API_PORT, ETCD_PORT,
#            WITH_CM=1 (also run kube-controller-manager), WITH_SCHED=1 (kube-scheduler)
set -euo pipefail
PREFIX="${K8S_PREFIX:-$HOME/.cache/warren/k8s}"   # layout produced by setup.sh
BIN_DIR="${BIN_DIR:-$PREFIX/bin}"
ETCD="${ETCD:-$BIN_DIR/etcd}"
RUN_DIR="${RUN_DIR:-$PREFIX/run}"
API_PORT="${API_PORT:-16443}"
ETCD_PORT="${ETCD_PORT:-12379}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-12380}"
TOKEN="${K8S_TOKEN:-envtest-admin-token}"

stop() {
  for n in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    if [ -f "$RUN_DIR/$n.pid" ]; then
      pid=$(cat "$RUN_DIR/$n.pid"); kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true; rm -f "$RUN_DIR/$n.pid"
    fi
  done
}

certs() {
  local d="$RUN_DIR/certs"; mkdir -p "$d"; cd "$d"
  [ -f ca.crt ] && return 0
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=envtest-ca" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n' > ext.cnf
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile ext.cnf 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  # static tokens: token,user,uid,"groups"
  printf '%s,admin,admin,"system:masters"\n%s,system:kube-controller-manager,kcm,""\n%s,system:kube-scheduler,sched,""\n' \
    "$TOKEN" "kcm-$TOKEN" "sched-$TOKEN" > tokens.csv
}

kubeconfig() { # file user token
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $RUN_DIR/certs/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: envtest
  context: {cluster: envtest, user: $2}
current-context: envtest
KC
}

start() {
  stop; mkdir -p "$RUN_DIR"; certs
  # etcd data on tmpfs-like /dev/shm when available (fast fsync)
  local data="${ETCD_DATA:-$( [ -d /dev/shm ] && echo /dev/shm/k8s-envtest-etcd-$API_PORT || echo $RUN_DIR/etcd-data )}"; rm -rf "$data"; mkdir -p "$data"
  local t0=$(date +%s.%N)
  extra=""; "$ETCD" --help 2>&1 | grep -q unsafe-no-fsync && extra="--unsafe-no-fsync"
  setsid "$ETCD" --name envtest --data-dir "$data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "envtest=http://127.0.0.1:$ETCD_PEER_PORT" $extra \
    > "$RUN_DIR/etcd.log" 2>&1 &
  echo $! > "$RUN_DIR/etcd.pid"
  setsid "$BIN_DIR/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --tls-cert-file "$RUN_DIR/certs/apiserver.crt" --tls-private-key-file "$RUN_DIR/certs/apiserver.key" \
    --client-ca-file "$RUN_DIR/certs/ca.crt" \
    --token-auth-file "$RUN_DIR/certs/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$RUN_DIR/certs/sa.pub" \
    --service-account-signing-key-file "$RUN_DIR/certs/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true --kubelet-preferred-address-types Hostname,InternalIP \
    $( [ "${WITH_CM:-0}" = 1 ] || echo --disable-admission-plugins=ServiceAccount ) \
    ${APISERVER_EXTRA:-} \
    > "$RUN_DIR/kube-apiserver.log" 2>&1 &
  echo $! > "$RUN_DIR/kube-apiserver.pid"
  kubeconfig "$RUN_DIR/admin.kubeconfig" admin "$TOKEN"
  # wait for readiness
  for i in $(seq 600); do
    if curl -sf --cacert "$RUN_DIR/certs/ca.crt" -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1; then break; fi
    kill -0 "$(cat "$RUN_DIR/kube-apiserver.pid")" 2>/dev/null || { echo "kube-apiserver died" >&2; tail -30 "$RUN_DIR/kube-apiserver.log" >&2; exit 1; }
    sleep 0.1
  done
  local t1=$(date +%s.%N)
  echo "# control plane ready in $(echo "$t1 - $t0" | bc) s" >&2
  if [ "${WITH_CM:-0}" = 1 ]; then
    kubeconfig "$RUN_DIR/kcm.kubeconfig" system:kube-controller-manager "kcm-$TOKEN"
    setsid "$BIN_DIR/kube-controller-manager" --kubeconfig "$RUN_DIR/kcm.kubeconfig" \
      --authentication-kubeconfig "$RUN_DIR/kcm.kubeconfig" --authorization-kubeconfig "$RUN_DIR/kcm.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port 0 --port 0 \
      --service-account-private-key-file "$RUN_DIR/certs/sa.key" --root-ca-file "$RUN_DIR/certs/ca.crt" \
      --use-service-account-credentials=true --leader-elect=false \
      --controllers '*,-bootstrapsigner,-tokencleaner' \
      --cluster-signing-cert-file "$RUN_DIR/certs/ca.crt" --cluster-signing-key-file "$RUN_DIR/certs/ca.key" \
      > "$RUN_DIR/kube-controller-manager.log" 2>&1 &
    echo $! > "$RUN_DIR/kube-controller-manager.pid"
  fi
  if [ "${WITH_SCHED:-0}" = 1 ]; then
    kubeconfig "$RUN_DIR/sched.kubeconfig" system:kube-scheduler "sched-$TOKEN"
    setsid "$BIN_DIR/kube-scheduler" --kubeconfig "$RUN_DIR/sched.kubeconfig" \
      --authentication-kubeconfig "$RUN_DIR/sched.kubeconfig" --authorization-kubeconfig "$RUN_DIR/sched.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port 0 --port 0 --leader-elect=false \
      > "$RUN_DIR/kube-scheduler.log" 2>&1 &
    echo $! > "$RUN_DIR/kube-scheduler.pid"
  fi
  echo "export KUBECONFIG=$RUN_DIR/admin.kubeconfig"
  echo "export K8S_API=https://127.0.0.1:$API_PORT K8S_TOKEN=$TOKEN K8S_CA=$RUN_DIR/certs/ca.crt"
}

case "${1:-start}" in start) start;; stop) stop;; *) echo "usage: $0 start|stop" >&2; exit 2;; esac
