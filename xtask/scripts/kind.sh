#!/bin/bash
# The kind path (machines with a Docker engine): image, cluster, agent DaemonSet.
#   kind.sh up     build the image, create cluster "warren", load the image, apply deploy/daemonset.yaml
#   kind.sh down   delete the cluster
# Needs docker (with a running engine), kind and kubectl on PATH. Run from the workspace root.
set -euo pipefail
CLUSTER="${WARREN_KIND_CLUSTER:-warren}"
TAG="dev"
need() { command -v "$1" >/dev/null 2>&1 || { echo "kind path: $1 is not installed ($2)" >&2; exit 1; }; }
need docker "https://docs.docker.com/engine/install/"
need kind "go install sigs.k8s.io/kind@latest, or a release binary"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
docker info >/dev/null 2>&1 || { echo "kind path: no Docker engine is running (docker info failed)" >&2; exit 1; }
case "${1:-up}" in
  up)
    for image in agent controller; do docker build -f deploy/docker/$image.Dockerfile -t "warren-$image:$TAG" .; done
    kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
    kind load docker-image "warren-agent:$TAG" "warren-controller:$TAG" --name "$CLUSTER"
    kubectl --context "kind-$CLUSTER" apply -f deploy/helm/warren/crds/istio.yaml -f deploy/daemonset.yaml -f deploy/controller.yaml
    kubectl --context "kind-$CLUSTER" -n warren-system rollout status deployment/warren-controller --timeout=120s
    kubectl --context "kind-$CLUSTER" -n warren-system rollout status daemonset/warren-agent --timeout=120s
    echo "warren-agent runs on every node: kubectl --context kind-$CLUSTER -n warren-system get pods -o wide"
    ;;
  down) kind delete cluster --name "$CLUSTER" ;;
  *) echo "usage: kind.sh up|down" >&2; exit 2 ;;
esac
