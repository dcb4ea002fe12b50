package deploy

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

const unit = "systemd/lazylayer-snapshotter.service"

// TestSystemdUnit: systemd-analyze verify finds nothing to say of the unit
// (it exits 0 on unknown keys and bad values, so any output fails), and the
// unit restarts the daemon without killing its FUSE helpers.
func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	service := iniSection(t, string(b), "Service")
	for _, want := range []string{"KillMode=process", "Restart=always", "FileDescriptorStoreMax=4096", "NotifyAccess=main"} {
		if !slices.Contains(service, want) {
			t.Errorf("[Service] of %s lacks %s", unit, want)
		}
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed (Debian's systemd package has it; script/setup.sh installs it): the unit is not verified")
	}
	// verify checks that ExecStart's program exists: put one where the
	// unit, copied, says it is.
	dir := t.TempDir()
	stand := filepath.Join(dir, "lazylayer-snapshotter")
	if err := os.WriteFile(stand, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	copied := filepath.Join(dir, filepath.Base(unit))
	text := strings.ReplaceAll(string(b), "/usr/local/bin/lazylayer-snapshotter", stand)
	if err := os.WriteFile(copied, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", "--man=no", copied).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
	}
}

// iniSection returns the key=value lines of a systemd unit's section.
func iniSection(t *testing.T, text, name string) []string {
	t.Helper()
	var lines []string
	in := false
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "["):
			in = l == "["+name+"]"
		case in:
			lines = append(lines, l)
		}
	}
	return lines
}

// nodeConfig is the part of the daemon's configuration the other files
// must agree with.
type nodeConfig struct {
	Root           string `toml:"root"`
	Address        string `toml:"address"`
	HostsDir       string `toml:"hosts_dir"`
	MetricsAddress string `toml:"metrics_address"`
	CRI            struct {
		Address           string `toml:"address"`
		ContainerdAddress string `toml:"containerd_address"`
	} `toml:"cri"`
}

func readNodeConfig(t *testing.T) (nodeConfig, []byte) {
	t.Helper()
	b, err := os.ReadFile("config.toml")
	if err != nil {
		t.Fatal(err)
	}
	var c nodeConfig
	if err := toml.Unmarshal(b, &c); err != nil {
		t.Fatalf("config.toml: %v", err)
	}
	return c, b
}

// TestKubernetesManifests decodes every object of the manifest strictly
// with the Kubernetes API types (an unknown or misspelt field fails), and
// checks that the DaemonSet runs the daemon as the node configuration
// needs: its ConfigMap holds config.toml as shipped, and the paths the
// configuration names are the host's.
func TestKubernetesManifests(t *testing.T) {
	b, err := os.ReadFile("kubernetes/lazylayer.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var (
		ns *corev1.Namespace
		cm *corev1.ConfigMap
		ds *appsv1.DaemonSet
	)
	for i, doc := range strings.Split(string(b), "\n---\n") {
		var tm metav1.TypeMeta
		doc += "\n" // the separator took the line break
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			t.Fatalf("object %d: %v", i, err)
		}
		var obj any
		switch tm.APIVersion + " " + tm.Kind {
		case "v1 Namespace":
			ns = new(corev1.Namespace)
			obj = ns
		case "v1 ConfigMap":
			cm = new(corev1.ConfigMap)
			obj = cm
		case "apps/v1 DaemonSet":
			ds = new(appsv1.DaemonSet)
			obj = ds
		default:
			t.Fatalf("object %d is a %q %q, not one this test knows", i, tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			t.Errorf("%s (object %d): %v", tm.Kind, i, err)
		}
	}
	if ns == nil || cm == nil || ds == nil {
		t.Fatalf("the manifest lacks a Namespace, ConfigMap or DaemonSet")
	}
	if cm.Namespace != ns.Name || ds.Namespace != ns.Name {
		t.Errorf("ConfigMap in %q, DaemonSet in %q, want both in the Namespace %q", cm.Namespace, ds.Namespace, ns.Name)
	}
	cfg, shipped := readNodeConfig(t)
	if got := cm.Data["config.toml"]; got != string(shipped) {
		t.Errorf("the ConfigMap's config.toml differs from script/deploy/config.toml:\n%s", got)
	}

	spec := ds.Spec.Template.Spec
	if sel := ds.Spec.Selector; sel == nil || sel.MatchLabels["app.kubernetes.io/name"] != ds.Spec.Template.Labels["app.kubernetes.io/name"] {
		t.Error("the DaemonSet's selector does not select its pods")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("the DaemonSet runs %d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("the daemon's container is not privileged: it cannot mount FUSE and overlay")
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	mounted := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		v, ok := volumes[m.Name]
		if !ok {
			t.Errorf("volume mount %s names no volume", m.Name)
			continue
		}
		if v.HostPath != nil && v.HostPath.Path != m.MountPath {
			t.Errorf("host path %s is mounted at %s: the daemon's paths must be the host's, which containerd uses", v.HostPath.Path, m.MountPath)
		}
		mounted[m.MountPath] = m
	}
	if v := volumes["config"]; v.ConfigMap == nil || v.ConfigMap.Name != cm.Name || mounted["/etc/lazylayer"].Name != "config" {
		t.Errorf("the ConfigMap %s is not mounted at /etc/lazylayer", cm.Name)
	}
	if !slices.Equal(c.Args, []string{"--config", "/etc/lazylayer/config.toml"}) {
		t.Errorf("the daemon runs with %q, want --config /etc/lazylayer/config.toml", c.Args)
	}
	if m := mounted[cfg.Root]; m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		t.Errorf("the root %s is not mounted with Bidirectional propagation: containerd would not see lazylayer's mounts", cfg.Root)
	}
	for _, p := range []string{filepath.Dir(cfg.Address), filepath.Dir(cfg.CRI.Address), filepath.Dir(cfg.CRI.ContainerdAddress), cfg.HostsDir, "/dev/fuse"} {
		if _, ok := mounted[p]; !ok {
			t.Errorf("the DaemonSet does not mount the host's %s", p)
		}
	}
	if !spec.HostNetwork || c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil ||
		c.LivenessProbe.HTTPGet.Host+":"+c.LivenessProbe.HTTPGet.Port.String() != cfg.MetricsAddress {
		t.Errorf("the liveness probe does not ask the metrics endpoint %s on the host's network", cfg.MetricsAddress)
	}
}

// TestContainerdConfig: the containerd configuration hands snapshots to
// lazylayer's socket, with the remote-snapshot labels, for CRI pulls too.
func TestContainerdConfig(t *testing.T) {
	cfg, _ := readNodeConfig(t)
	b, err := os.ReadFile("containerd/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Version      int `toml:"version"`
		ProxyPlugins map[string]struct {
			Type    string            `toml:"type"`
			Address string            `toml:"address"`
			Exports map[string]string `toml:"exports"`
		} `toml:"proxy_plugins"`
		Plugins map[string]map[string]any `toml:"plugins"`
	}
	if err := toml.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	if c.Version != 3 {
		t.Errorf("version = %d, want 3 (containerd 2.x)", c.Version)
	}
	p := c.ProxyPlugins["lazylayer"]
	if p.Type != "snapshot" || p.Address != cfg.Address || p.Exports["enable_remote_snapshot_annotations"] != "true" {
		t.Errorf("proxy_plugins.lazylayer = %+v, want a snapshot plugin at %s with remote-snapshot annotations", p, cfg.Address)
	}
	if sn := c.Plugins["io.containerd.cri.v1.images"]["snapshotter"]; sn != "lazylayer" {
		t.Errorf("CRI images snapshotter = %v, want lazylayer", sn)
	}
	reg, _ := c.Plugins["io.containerd.cri.v1.images"]["registry"].(map[string]any)
	if reg["config_path"] != cfg.HostsDir {
		t.Errorf("CRI registry config_path = %v, want lazylayer's hosts_dir %s", reg["config_path"], cfg.HostsDir)
	}
	unpack, _ := c.Plugins["io.containerd.transfer.v1.local"]["unpack_config"].([]any)
	found := false
	for _, u := range unpack {
		if m, _ := u.(map[string]any); m["snapshotter"] == "lazylayer" {
			found = true
		}
	}
	if !found {
		t.Error("the transfer service has no unpack_config for lazylayer")
	}
}
