#!/bin/bash
# The kind path (machines with a Docker engine), the same steps as the local node's tests/e2e/tests/helm.rs:
#   kind.sh up       build both images (deploy/docker/), create cluster "warren", load the images
#   kind.sh install  helm install deploy/helm/warren (helm from PATH, or the one `cargo xtask setup --kubernetes` installs)
#   kind.sh e2e      the user's walk: two pods talk → label their namespace → enrolled, HBONE → unlabel → still
#                    talking → helm uninstall → no agent left; prints each step, exits 1 at the first failure
#   kind.sh down     delete the cluster
# Needs docker (with a running engine), kind and kubectl on PATH. Run from the workspace root.
set -euo pipefail
CLUSTER="${WARREN_KIND_CLUSTER:-warren}"
TAG="dev"
NS=warren-system
CONTEXT="kind-$CLUSTER"
need() { command -v "$1" >/dev/null 2>&1 || { echo "kind path: $1 is not installed ($2)" >&2; exit 1; }; }
need docker "https://docs.docker.com/engine/install/"
need kind "go install sigs.k8s.io/kind@latest, or a release binary"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
docker info >/dev/null 2>&1 || { echo "kind path: no Docker engine is running (docker info failed)" >&2; exit 1; }
kc() { kubectl --context "$CONTEXT" "$@"; }
helm_bin() {
  if command -v helm >/dev/null 2>&1; then echo helm; return; fi
  local cached="${WARREN_CACHE:-$HOME/.cache/warren}/k8s/bin/helm"
  [ -x "$cached" ] || { echo "kind path: helm is not installed (cargo xtask setup --kubernetes, or https://helm.sh)" >&2; exit 1; }
  echo "$cached"
}
step() { echo "== $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
# Retries "$@" (a command that succeeds when the condition holds) for up to $1 seconds.
within() {
  local seconds=$1; shift
  for _ in $(seq "$seconds"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}
agent() { kc -n "$NS" exec ds/warren-agent -- warren-agent "$@"; }
enrolled() { agent inspect workloads -n walk --pod "$1" -o json | grep -q '"enrolled": true'; }
unenrolled() { agent inspect workloads -n walk --pod "$1" -o json | grep -q '"enrolled": false'; }
hbone() { agent inspect connections -n walk --pod client | grep -q hbone; }
answered() { kc -n walk logs client --tail=5 | grep -q "OK"; }

case "${1:-up}" in
  up)
    for image in agent controller; do docker build -f deploy/docker/$image.Dockerfile -t "warren-$image:$TAG" .; done
    kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
    kind load docker-image "warren-agent:$TAG" "warren-controller:$TAG" --name "$CLUSTER"
    echo "cluster $CLUSTER is up with the images loaded: cargo xtask kind install"
    ;;
  install)
    "$(helm_bin)" --kube-context "$CONTEXT" upgrade --install warren deploy/helm/warren -n "$NS" --create-namespace \
      --set image.tag="$TAG" --set gateways.ingress.service.type=NodePort --wait --timeout 180s
    kc -n "$NS" rollout status daemonset/warren-agent --timeout=120s
    echo "warren runs on every node: kubectl --context $CONTEXT -n $NS get pods -o wide"
    ;;
  e2e)
    step "two pods of namespace walk talk in plaintext"
    kc create namespace walk --dry-run=client -o yaml | kc apply -f -
    kc -n walk run server --image=busybox:1.36 --restart=Never -- httpd -f -p 8080 -h /etc
    kc -n walk wait --for=condition=Ready pod/server --timeout=120s
    SERVER_IP=$(kc -n walk get pod server -o jsonpath='{.status.podIP}')
    kc -n walk run client --image=busybox:1.36 --restart=Never -- sh -c \
      "while true; do wget -q -O /dev/null http://$SERVER_IP:8080/hostname && echo OK || echo FAIL; sleep 0.5; done"
    kc -n walk wait --for=condition=Ready pod/client --timeout=120s
    within 30 answered || fail "the client gets no answers before the mesh"
    step "label the namespace: the running pods are enrolled, traffic is HBONE"
    kc label namespace walk warren.dev/mesh=enabled --overwrite
    within 30 enrolled client || fail "client not enrolled"
    within 30 enrolled server || fail "server not enrolled"
    within 30 hbone || fail "no HBONE connection from the client"
    agent inspect connections -n walk --pod client | head -5
    step "unlabel: plain networking again, still talking"
    kc label namespace walk warren.dev/mesh-
    within 30 unenrolled client || fail "client still enrolled"
    sleep 2; within 10 answered || fail "the client stopped getting answers once unmeshed"
    step "helm uninstall: the pods keep talking, no agent is left"
    "$(helm_bin)" --kube-context "$CONTEXT" uninstall warren -n "$NS" --wait
    within 60 sh -c "! kubectl --context $CONTEXT -n $NS get pods -o name | grep -q ." || fail "warren pods left"
    sleep 2; within 10 answered || fail "the pods stopped talking after helm uninstall"
    kc delete namespace walk --wait=false
    echo "PASSED: install → label → HBONE → unlabel → uninstall on kind"
    ;;
  down) kind delete cluster --name "$CLUSTER" ;;
  *) echo "usage: kind.sh up|install|e2e|down" >&2; exit 2 ;;
esac
