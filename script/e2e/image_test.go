package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// pushed is an image a test pushed.
type pushed struct {
	ref      string // registry/repo:tag
	manifest digest.Digest
	layers   []ocispec.Descriptor
}

func push(t *testing.T, regAddr, repoTag string, img testimage.Image) pushed {
	t.Helper()
	dgst, layers, err := testimage.Push(context.Background(), regAddr, repoTag, img)
	if err != nil {
		t.Fatalf("push %s: %v", repoTag, err)
	}
	return pushed{ref: regAddr + "/" + repoTag, manifest: dgst, layers: layers}
}

// chainID returns the snapshot name of the image's top layer, computed from
// the diff IDs of its config in the registry.
func (p pushed) chainID(t *testing.T) string {
	t.Helper()
	host, repo, _ := strings.Cut(p.ref, "/")
	repo, _, _ = strings.Cut(repo, ":")
	var m ocispec.Manifest
	getJSON(t, fmt.Sprintf("http://%s/v2/%s/manifests/%s", host, repo, p.manifest), &m)
	var cfg ocispec.Image
	getJSON(t, fmt.Sprintf("http://%s/v2/%s/blobs/%s", host, repo, m.Config.Digest), &cfg)
	return identity.ChainID(cfg.RootFS.DiffIDs).String()
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Accept", ocispec.MediaTypeImageManifest)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
}

// mountView mounts a read-only view of snapshot parent of snapshotter sn and
// returns where; it is unmounted and removed in t.Cleanup.
func (e *env) mountView(sn, key, parent string) string {
	e.t.Helper()
	target := filepath.Join(e.dir, "view-"+key)
	if err := os.MkdirAll(target, 0o755); err != nil {
		e.t.Fatal(err)
	}
	mounts := e.view(sn, key, parent)
	if err := mount.All(mounts, target); err != nil {
		e.t.Fatalf("mount view %s of %s at %s: %v", key, sn, target, err)
	}
	e.t.Cleanup(func() {
		if err := unix.Unmount(target, 0); err != nil {
			e.t.Errorf("unmount %s: %v", target, err)
		}
		e.ctrErr("snapshots", "--snapshotter", sn, "rm", key)
	})
	return target
}

// view makes a view snapshot through containerd's snapshots service. It is
// labelled a GC root, as ctr's "snapshots prepare" does: containerd's
// garbage collector removes an unreferenced view (which is what "ctr
// snapshots view" makes) whenever it runs, and it runs after pulls.
func (e *env) view(sn, key, parent string) []mount.Mount {
	e.t.Helper()
	conn, err := grpc.NewClient("unix://"+e.ctrSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), "default"), time.Minute)
	defer cancel()
	svc := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), sn)
	mounts, err := svc.View(ctx, key, parent, snapshots.WithLabels(map[string]string{
		"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339),
	}))
	if err != nil {
		e.t.Fatalf("view %s of %s in %s: %v", key, parent, sn, err)
	}
	return mounts
}

// contentHas reports which of the image's layer blobs containerd's content
// store holds (namespace "default", where ctr works).
func (e *env) contentHas(p pushed) []digest.Digest { return e.contentHasIn("default", p) }

// contentHasIn is contentHas for namespace ns.
func (e *env) contentHasIn(ns string, p pushed) []digest.Digest {
	e.t.Helper()
	out := e.ctr("-n", ns, "content", "ls", "-q")
	var held []digest.Digest
	for _, l := range p.layers {
		if strings.Contains(out, l.Digest.String()) {
			held = append(held, l.Digest)
		}
	}
	return held
}
