//! Warren's end-to-end tests live in `tests/`: each file is a group of scenarios on the testbed
//! (real eBPF, real sockets in network namespaces) or on the local Kubernetes cluster.
