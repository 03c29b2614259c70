#!/bin/bash
# Start containerd (Debian bookworm 1.6.20, extracted .deb) + kubelet v1.20.2 against the local apiserver.
#   node-up.sh start|stop     (requires envtest-up.sh with WITH_CM=1 WITH_SCHED=1 already running)
set -euo pipefail
P="${K8S_PREFIX:-$HOME/.cache/warren/k8s}"   # layout produced by setup.sh
CT=$P/tools/ct; N=$P/node; RUN_DIR=${RUN_DIR:-$P/run}
export PATH=$CT/usr/bin:$CT/usr/sbin:$PATH
stop() {
  # 1) kubelet first, 2) kill every container task in containerd's k8s.io namespace, 3) containerd, 4) shims, 5) CNI netns
  if [ -f $N/kubelet.pid ]; then kill $(cat $N/kubelet.pid) 2>/dev/null || true; sleep 1; kill -9 $(cat $N/kubelet.pid) 2>/dev/null || true; rm -f $N/kubelet.pid; fi
  if [ -S $N/containerd/containerd.sock ] && [ -f $N/containerd.pid ] && kill -0 $(cat $N/containerd.pid) 2>/dev/null; then
    C="ctr -a $N/containerd/containerd.sock -n k8s.io"
    for t in $($C tasks ls -q 2>/dev/null); do $C tasks kill -a -s SIGKILL $t >/dev/null 2>&1 || true; done
    sleep 1
    for t in $($C tasks ls -q 2>/dev/null); do $C tasks rm -f $t >/dev/null 2>&1 || true; done
  fi
  if [ -f $N/containerd.pid ]; then pid=$(cat $N/containerd.pid); kill $pid 2>/dev/null || true
    for _ in $(seq 50); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done; kill -9 $pid 2>/dev/null || true; rm -f $N/containerd.pid; fi
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $N/containerd/containerd.sock" || true); do kill $pid 2>/dev/null || true; done
  for m in $(mount | awk '$1=="nsfs" && $3 ~ /^\/run\/netns\/cni-/ {print $3}'); do umount $m 2>/dev/null && rm -f $m; done
}
start() {
  stop; mkdir -p $N/containerd $N/cni-conf $N/kubelet
  # As on a systemd node: bpffs at /sys/fs/bpf, shared, so that a DaemonSet can mount it with
  # Bidirectional propagation (the kubelet refuses a private one).
  grep -q " /sys/fs/bpf .* - bpf " /proc/self/mountinfo || mount -t bpf bpf /sys/fs/bpf
  mount --make-shared /sys/fs/bpf
  cat > $N/containerd/config.toml <<TOML
version = 2
root = "$N/containerd/root"
state = "$N/containerd/state"
[grpc]
  address = "$N/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.6"
  # this VM drops CAP_SYS_RESOURCE: negative oom_score_adj (pause=-998, Guaranteed=-997) is EACCES
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$CT/usr/sbin/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CT/usr/lib/cni"
    conf_dir = "$N/cni-conf"
TOML
  cat > $N/cni-conf/10-bridge.conflist <<JSON
{"cniVersion":"0.4.0","name":"warren-local","plugins":[
 {"type":"bridge","bridge":"wrnk8s0","isGateway":true,"ipMasq":false,
  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.0.0/24"}]],"dataDir":"$N/cni-ipam"}},
 {"type":"loopback"}]}
JSON
  setsid containerd --config $N/containerd/config.toml > $N/containerd.log 2>&1 &
  echo $! > $N/containerd.pid
  for _ in $(seq 100); do [ -S $N/containerd/containerd.sock ] && break; sleep 0.1; done
  for img in $P/images/*.tar; do ctr -a $N/containerd/containerd.sock -n k8s.io images import "$img" >/dev/null; done
  cat > $N/kubelet/config.yaml <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
address: 127.0.0.1
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
YAML
  setsid $P/bin/kubelet --config $N/kubelet/config.yaml --kubeconfig $RUN_DIR/admin.kubeconfig \
    --root-dir $N/kubelet/root --cert-dir $N/kubelet/pki --hostname-override localhost \
    --container-runtime remote --container-runtime-endpoint unix://$N/containerd/containerd.sock \
    --pod-infra-container-image registry.k8s.io/pause:3.6 > $N/kubelet.log 2>&1 &
  echo $! > $N/kubelet.pid
}
case "${1:-start}" in start) start;; stop) stop;; esac
