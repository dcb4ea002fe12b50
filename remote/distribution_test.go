package remote

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// distributionBinary is Debian's docker-registry (distribution 2.8).
const distributionBinary = "/usr/bin/docker-registry"

// startDistribution runs a real registry on 127.0.0.1 for the test and
// returns its host:port. script/internal/registry has the full harness, but
// Go's internal rule keeps it from packages outside script/.
func startDistribution(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(distributionBinary); err != nil {
		t.Skipf("docker-registry not installed (script/setup.sh): %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %q\nhttp:\n  addr: %q\n  secret: lazylayer-test\n",
		filepath.Join(dir, "storage"), addr)
	if err := os.WriteFile(filepath.Join(dir, "config.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	cmd := exec.Command(distributionBinary, "serve", filepath.Join(dir, "config.yml"))
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("registry log:\n%s", log.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return addr
			}
		}
		select {
		case <-exited:
			t.Fatalf("registry exited:\n%s", log.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("registry on %s did not answer: %v", addr, err)
		}
	}
}

// TestPushToDistribution pushes an image and an index to a real registry,
// resolves them back and pushes again without uploading.
func TestPushToDistribution(t *testing.T) {
	addr := startDistribution(t)
	ctx := t.Context()
	r := NewResolver(testOptions(t))
	ref := addr + "/lazylayer/push:v1"

	layer := bytes.Repeat([]byte("not really a tar "), 50000)
	layerDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(layer), Size: int64(len(layer))}
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	configDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(config), Size: int64(len(config))}
	for _, b := range []struct {
		desc    ocispec.Descriptor
		content []byte
	}{{layerDesc, layer}, {configDesc, config}} {
		if err := r.PushBlob(ctx, ref, b.desc, bytes.NewReader(b.content)); err != nil {
			t.Fatal(err)
		}
	}
	manifest, err := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    []ocispec.Descriptor{layerDesc},
	})
	if err != nil {
		t.Fatal(err)
	}
	mdgst, err := r.PushManifest(ctx, ref, ocispec.MediaTypeImageManifest, manifest)
	if err != nil {
		t.Fatal(err)
	}
	index, err := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{{
			MediaType: ocispec.MediaTypeImageManifest, Digest: mdgst, Size: int64(len(manifest)),
			Platform: &ocispec.Platform{OS: "linux", Architecture: "amd64"},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	idgst, err := r.PushManifest(ctx, addr+"/lazylayer/push:multi", ocispec.MediaTypeImageIndex, index)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		ref  string
		want ocispec.Descriptor
	}{
		{ref, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: mdgst, Size: int64(len(manifest))}},
		{addr + "/lazylayer/push@" + mdgst.String(), ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: mdgst, Size: int64(len(manifest))}},
		{addr + "/lazylayer/push:multi", ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: idgst, Size: int64(len(index))}},
	} {
		got, err := r.Resolve(ctx, tc.ref)
		if err != nil {
			t.Fatal(err)
		}
		if got.MediaType != tc.want.MediaType || got.Digest != tc.want.Digest || got.Size != tc.want.Size {
			t.Errorf("resolve %s: %+v, want %+v", tc.ref, got, tc.want)
		}
	}
	idx, err := r.Index(ctx, ref, idgst)
	if err != nil || len(idx.Manifests) != 1 || idx.Manifests[0].Digest != mdgst {
		t.Fatalf("index: %+v, %v", idx, err)
	}
	m, err := r.Manifest(ctx, ref, mdgst)
	if err != nil || m.Layers[0].Digest != layerDesc.Digest {
		t.Fatalf("manifest: %+v, %v", m, err)
	}

	// Pushing the layer again only asks whether it is there.
	before, _ := r.Stats()
	if err := r.PushBlob(ctx, addr+"/lazylayer/push", layerDesc, bytes.NewReader(layer)); err != nil {
		t.Fatal(err)
	}
	if after, _ := r.Stats(); after-before != 1 {
		t.Errorf("second push sent %d requests, want 1 (HEAD)", after-before)
	}
	// A blob that does not match its digest is refused.
	bad := ocispec.Descriptor{Digest: digest.FromString("other"), Size: int64(len(layer))}
	err = r.PushBlob(ctx, ref, bad, bytes.NewReader(layer))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "DIGEST_INVALID") {
		t.Fatalf("pushing a blob under the wrong digest: got %v, want DIGEST_INVALID", err)
	}
}
