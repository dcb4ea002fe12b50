package main

import (
	"os"
	"strings"
	"testing"
)

// The modes' descriptions name the peers' versions: they must be the ones
// the bench module builds.
func TestPeerVersionsMatchGoMod(t *testing.T) {
	b, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	for mod, v := range map[string]string{
		"github.com/containerd/stargz-snapshotter": stargzVersion,
		"github.com/awslabs/soci-snapshotter":      sociVersion,
	} {
		if !strings.Contains(string(b), "\t"+mod+" "+v+"\n") && !strings.Contains(string(b), "\t"+mod+" "+v+" ") {
			t.Errorf("go.mod does not require %s %s", mod, v)
		}
	}
}

func TestPeerContainerdConfig(t *testing.T) {
	got := peerContainerdConfig("stargz", "/s/stargz.sock")
	for _, want := range []string{"[proxy_plugins.stargz]", `address = "/s/stargz.sock"`, `enable_remote_snapshot_annotations = "true"`, `snapshotter = "stargz"`} {
		if !strings.Contains(got, want) {
			t.Errorf("config lacks %q:\n%s", want, got)
		}
	}
}
