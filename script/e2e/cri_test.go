package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// criPlugins are the CRI plugins script/containerd.toml disables.
const criPlugins = `"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", `

// criConfig turns containerd's CRI plugin on, with lazylayer as its
// snapshotter and remote-snapshot labels passed (as a Kubernetes node
// would set it), the pod sandbox image from the test registry, and
// hosts.toml from hostsDir. Pods use the host's network, so no CNI is
// needed; the CNI directories are the test's own, empty. The test machines
// lack CAP_SYS_RESOURCE, so the pause container cannot lower its OOM score
// below containerd's: restrict_oom_score_adj keeps it there.
func criConfig(t *testing.T, dir, hostsDir, sandboxRef, imagesExtra string) func(string) string {
	return func(config string) string {
		if !strings.Contains(config, criPlugins) {
			t.Fatalf("script/containerd.toml no longer disables %s", criPlugins)
		}
		config = strings.Replace(config, criPlugins, "", 1)
		return config + `
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "lazylayer"
` + imagesExtra + `
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "` + sandboxRef + `"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "` + hostsDir + `"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["` + filepath.Join(dir, "cni-bin") + `"]
    conf_dir = "` + filepath.Join(dir, "cni-conf") + `"
`
	}
}

// cri is a CRI client on the test's containerd, as the kubelet would use.
type cri struct {
	runtime runtime.RuntimeServiceClient
	image   runtime.ImageServiceClient
}

func (e *env) cri() cri {
	e.t.Helper()
	conn, err := grpc.NewClient("unix://"+e.ctrSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return cri{runtime: runtime.NewRuntimeServiceClient(conn), image: runtime.NewImageServiceClient(conn)}
}

// TestCRI: Kubernetes' path. The kubelet pulls through CRI, which passes
// the remote-snapshot labels to lazylayer; an eStargz image is mounted
// lazily, and a pod's container runs from it and reads what it needs.
// containerd 2.x's CRI pulls with the transfer service; configurations
// written for stargz-snapshotter set disable_snapshot_annotations, which
// makes it fall back to its own pull. Both must work.
func TestCRI(t *testing.T) {
	t.Run("transfer", func(t *testing.T) { testCRI(t, "") })
	t.Run("local-pull", func(t *testing.T) { testCRI(t, "  disable_snapshot_annotations = false") })
}

// criNode pushes the pod sandbox image to the registry at regAddr and
// makes the directories of a CRI node: CNI binaries and configuration,
// logs, and a hosts.toml directory that sends pulls for regAddr to
// server. It returns the sandbox image, the directory and the hosts
// directory.
func criNode(t *testing.T, regAddr, server string) (sandbox pushed, dir, hosts string) {
	t.Helper()
	pause := testimage.Busybox()
	pause.Config.Cmd = []string{"/bin/sleep", "2147483647"}
	sandbox = push(t, regAddr, "e2e/pause:1", pause)
	dir = t.TempDir()
	for _, d := range []string{"cni-bin", "cni-conf", "logs"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	hosts = filepath.Join(dir, "hosts")
	writeHosts(t, hosts, regAddr, server)
	return sandbox, dir, hosts
}

func testCRI(t *testing.T, imagesExtra string) {
	localPull := imagesExtra != ""
	reg, proxy := startRegistry(t)
	sandbox, dir, hosts := criNode(t, reg.Addr(), reg.Addr())
	e := newEnvWith(t, reg.Addr(), proxy.Addr(), criConfig(t, dir, hosts, sandbox.ref, imagesExtra), "[lazy]\n  populate = \"manual\"\n")
	src := push(t, reg.Addr(), "e2e/cri:gzip", sampleImage("cri"))
	img := e.convert(src, "e2e/cri:estargz")
	c := e.cri()
	log, err := os.ReadFile(filepath.Join(e.dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	if fellBack := strings.Contains(string(log), "Falling back to local image pull mode"); fellBack != localPull {
		t.Fatalf("containerd's CRI uses its local pull: %v, want %v", fellBack, localPull)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	proxy.Reset()
	if _, err := c.image.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: img.ref}}); err != nil {
		t.Fatalf("CRI PullImage %s: %v\n%s", img.ref, err, e.lazyLogText())
	}
	if n := len(e.lazyMounts()); n != len(img.layers) {
		t.Fatalf("after the CRI pull, %d lazy FUSE mounts for %d eStargz layers\n%s", n, len(img.layers), e.lazyLogText())
	}
	if held := e.contentHasIn("k8s.io", img); len(held) > 0 {
		t.Errorf("containerd's content store (k8s.io) holds layer blobs %v", held)
	}

	podConfig := &runtime.PodSandboxConfig{
		Metadata:     &runtime.PodSandboxMetadata{Name: "lazy", Uid: "e2e-cri-pod", Namespace: "e2e", Attempt: 0},
		LogDirectory: filepath.Join(dir, "logs"),
		Linux: &runtime.LinuxPodSandboxConfig{SecurityContext: &runtime.LinuxSandboxSecurityContext{
			NamespaceOptions: &runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE},
		}},
	}
	pod, err := c.runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podConfig})
	if err != nil {
		t.Fatalf("CRI RunPodSandbox: %v\n%s", err, e.lazyLogText())
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := c.runtime.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: pod.PodSandboxId}); err != nil {
			t.Errorf("CRI StopPodSandbox: %v", err)
		}
		if _, err := c.runtime.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: pod.PodSandboxId}); err != nil {
			t.Errorf("CRI RemovePodSandbox: %v", err)
		}
	})
	app, err := c.runtime.CreateContainer(ctx, &runtime.CreateContainerRequest{
		PodSandboxId: pod.PodSandboxId,
		Config: &runtime.ContainerConfig{
			Metadata: &runtime.ContainerMetadata{Name: "app"},
			Image:    &runtime.ImageSpec{Image: img.ref},
			Command:  []string{"sh", "-c", "cat /hello /srv/hello.txt"},
			LogPath:  "app.log",
		},
		SandboxConfig: podConfig,
	})
	if err != nil {
		t.Fatalf("CRI CreateContainer: %v", err)
	}
	if _, err := c.runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: app.ContainerId}); err != nil {
		t.Fatalf("CRI StartContainer: %v", err)
	}
	var status *runtime.ContainerStatus
	waitFor(t, "the pod's container to exit", func() bool {
		st, err := c.runtime.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: app.ContainerId})
		if err != nil {
			t.Fatalf("CRI ContainerStatus: %v", err)
		}
		status = st.Status
		return status.State == runtime.ContainerState_CONTAINER_EXITED
	})
	if status.ExitCode != 0 {
		t.Errorf("the container exited with %d (%s: %s)", status.ExitCode, status.Reason, status.Message)
	}
	if got, want := criLogText(t, filepath.Join(dir, "logs", "app.log")), "hello from cri\nhello from lazylayer\n"; got != want {
		t.Errorf("the container printed %q, want %q", got, want)
	}
	served, total := blobBytes(proxy.Stats(), img)
	t.Logf("the registry served %d of %d layer bytes to lazylayer", served, total)
	if served*2 > total {
		t.Errorf("the registry served %d of %d layer bytes: the 8 MiB file nobody read was fetched", served, total)
	}
}

// criLogText is what a container wrote to its CRI log: each line is
// "TIME STREAM TAG TEXT", with tag P for a partial line.
func criLogText(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("container log: %v", err)
	}
	var out strings.Builder
	for line := range strings.Lines(string(b)) {
		f := strings.SplitN(strings.TrimSuffix(line, "\n"), " ", 4)
		if len(f) < 4 {
			t.Fatalf("container log line %q is not in CRI's format", line)
		}
		out.WriteString(f[3])
		if f[2] == "F" {
			out.WriteString("\n")
		}
	}
	return out.String()
}
