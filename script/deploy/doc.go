// Package deploy holds lazylayer's deployment files, not Go code: the
// systemd unit (systemd/), the node configuration (config.toml), the
// containerd configuration a node needs (containerd/) and the Kubernetes
// DaemonSet with its ConfigMap (kubernetes/). Its test validates them:
// the unit with systemd-analyze verify, the manifests decoded strictly as
// Kubernetes objects. docs/install.md says how to use them.
package deploy
