// Package criproxy is a CRI image-service proxy: the kubelet's
// --image-service-endpoint points at it, and it forwards every call to
// containerd's CRI unchanged. On the way it hands the registry credentials
// of each PullImage (what the kubelet took from the pod's image pull
// secrets) to a [Recorder], so that lazylayer can fetch that image's layers
// lazily with them, long after the pull returned.
//
// What criproxy is not: it keeps no credentials itself (the Recorder
// decides how long they live), writes nothing to disk, logs no credential,
// and does not touch the runtime service: the kubelet's
// --container-runtime-endpoint stays containerd's.
package criproxy
