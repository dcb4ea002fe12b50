package e2e

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// TestBadInput: layers whose data is wrong are refused with an error naming
// what was wrong, nothing is left under lazylayer's root, and the daemon
// keeps serving. Registry failures are retried or left to containerd.
func TestBadInput(t *testing.T) {
	reg, proxy := startRegistry(t)
	e := newEnv(t, reg.Addr(), proxy.Addr())

	// good checks that the daemon still serves a good image end to end.
	good := func(t *testing.T, tag string) {
		t.Helper()
		img := push(t, reg.Addr(), "e2e/good:"+tag, sampleImage(tag))
		if out, err := e.pull("lazylayer", img.ref); err != nil {
			t.Fatalf("after the bad image, pulling a good one failed: %v\n%s", err, out)
		}
		if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "good-"+tag, "cat", "/hello"); out != "hello from "+tag+"\n" {
			t.Errorf("good container printed %q", out)
		}
	}
	rawImage := func(entries ...testimage.Entry) testimage.Image {
		var buf bytes.Buffer
		if err := testimage.WriteTar(&buf, entries); err != nil {
			t.Fatal(err)
		}
		return testimage.Busybox(testimage.RawLayer(buf.Bytes(), testimage.Gzip))
	}

	// The bad images share their busybox base with the good one: pull it
	// first, so that a bad pull's only new snapshot is the bad layer's.
	good(t, "warmup")

	for _, tc := range []struct {
		name    string
		image   testimage.Image
		corrupt func(t *testing.T, blob string) // damages the last layer's blob in the registry's storage
		want    string
	}{
		{
			name: "digest mismatch",
			image: testimage.Busybox(testimage.Layer{Compression: testimage.None, Entries: []testimage.Entry{
				testimage.BigFile("payload", 0o644, testimage.Random(11, 3<<20)),
			}}),
			corrupt: func(t *testing.T, blob string) {
				f, err := os.OpenFile(blob, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if _, err := f.WriteAt([]byte("corrupted by the test"), 2<<20); err != nil {
					t.Fatal(err)
				}
			},
			want: "blob bytes have digest",
		},
		{
			name: "truncated blob",
			image: testimage.Busybox(testimage.Layer{Compression: testimage.Gzip, Entries: []testimage.Entry{
				testimage.BigFile("payload", 0o644, testimage.Random(12, 3<<20)),
			}}),
			corrupt: func(t *testing.T, blob string) {
				st, err := os.Stat(blob)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.Truncate(blob, st.Size()/2); err != nil {
					t.Fatal(err)
				}
			},
			want: "lazylayer rejected the layer",
		},
		{
			name:  "dotdot path",
			image: rawImage(testimage.File("../../../../tmp/lazylayer-escape", 0o644, "escaped\n")),
			want:  `"../../../../tmp/lazylayer-escape": path escapes the layer root`,
		},
		{
			name:  "absolute path",
			image: rawImage(testimage.File("/tmp/lazylayer-escape", 0o644, "escaped\n")),
			want:  `"/tmp/lazylayer-escape": absolute path`,
		},
		{
			name: "write through symlink",
			image: rawImage(
				testimage.Symlink("escape", "/tmp"),
				testimage.File("escape/lazylayer-escape", 0o644, "escaped\n"),
			),
			want: `path goes through symlink "escape"`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tag := strings.ReplaceAll(tc.name, " ", "-")
			img := push(t, reg.Addr(), "e2e/bad:"+tag, tc.image)
			last := img.layers[len(img.layers)-1]
			if tc.corrupt != nil {
				tc.corrupt(t, reg.BlobPath(last.Digest))
			}
			before := e.snapshotDirs()
			out, err := e.pull("lazylayer", img.ref)
			if err == nil {
				t.Fatalf("pull of a bad image succeeded:\n%s", out)
			}
			t.Logf("ctr image pull: %s", out[strings.LastIndex(out, "ctr: "):])
			if !strings.Contains(out, tc.want) || !strings.Contains(out, last.Digest.String()) {
				t.Errorf("pull error does not name the layer and say %q:\n%s", tc.want, out)
			}
			if _, err := os.Lstat("/tmp/lazylayer-escape"); err == nil {
				os.Remove("/tmp/lazylayer-escape")
				t.Errorf("the layer wrote /tmp/lazylayer-escape outside its root")
			}
			if left := e.leftovers(before); len(left) > 0 {
				t.Errorf("half-written state left under the root: %v", left)
			}
			good(t, tag)
		})
	}

	t.Run("registry 500s then recovers", func(t *testing.T) {
		img := push(t, reg.Addr(), "e2e/flaky:1", sampleImage("flaky"))
		proxy.Reset()
		proxy.FailNext(2, 500)
		if out, err := e.pull("lazylayer", img.ref); err != nil {
			t.Fatalf("pull: %v\n%s", err, out)
		}
		failed := 0
		for _, r := range proxy.Requests() {
			if r.Status == 500 {
				failed++
			}
		}
		if failed != 2 {
			t.Errorf("the proxy answered 500 %d times, want 2", failed)
		}
		if held := e.contentHas(img); len(held) > 0 {
			t.Errorf("containerd fetched layers %v itself: lazylayer did not retry", held)
		}
		if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "flaky", "cat", "/hello"); out != "hello from flaky\n" {
			t.Errorf("container printed %q", out)
		}
	})

	t.Run("registry unreachable falls back to containerd", func(t *testing.T) {
		img := push(t, reg.Addr(), "e2e/unreachable:1", sampleImage("unreachable"))
		if err := proxy.Refuse(); err != nil {
			t.Fatal(err)
		}
		defer proxy.Accept()
		if out, err := e.pull("lazylayer", img.ref); err != nil {
			t.Fatalf("pull did not fall back to containerd: %v\n%s", err, out)
		}
		if out := e.ctr("run", "--rm", "--snapshotter", "lazylayer", img.ref, "unreachable", "cat", "/hello"); out != "hello from unreachable\n" {
			t.Errorf("container printed %q", out)
		}
		if !strings.Contains(e.lazyLogText(), "cannot fetch layer; containerd will pull and unpack it instead") {
			t.Error("the log does not say why lazylayer left the layer to containerd")
		}
		uniqueLayer := img.layers[len(img.layers)-1].Digest
		if held := e.contentHas(img); !containsDigest(held, uniqueLayer) {
			t.Errorf("containerd's content store lacks %s: who pulled it?", uniqueLayer)
		}
	})
}

func containsDigest(ds []digest.Digest, d digest.Digest) bool {
	for _, x := range ds {
		if x == d {
			return true
		}
	}
	return false
}
