package snapshot

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestMountOverlayManyLayers: an overlay whose options are far longer
// than mount(2)'s page mounts, with data-only layers, and reads right.
func TestMountOverlayManyLayers(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting overlay needs root")
	}
	long := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	var lowers []string
	for i := range 60 {
		dir := filepath.Join(long, fmt.Sprintf("layer-%02d", i))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%02d", i)), []byte(fmt.Sprint(i)), 0o644); err != nil {
			t.Fatal(err)
		}
		lowers = append(lowers, dir)
	}
	data := filepath.Join(long, "data")
	os.MkdirAll(data, 0o755)
	lowerdir := strings.Join(lowers, ":") + "::" + data
	if len(lowerdir) < 8192 {
		t.Fatalf("lowerdir of %d bytes does not test the page limit", len(lowerdir))
	}
	target := filepath.Join(t.TempDir(), "merged")
	os.Mkdir(target, 0o755)
	if err := mountOverlay(target, true, []string{"lowerdir=" + lowerdir}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(target, 0); err != nil {
			t.Error(err)
		}
	})
	for _, i := range []int{0, 59} {
		b, err := os.ReadFile(filepath.Join(target, fmt.Sprintf("f%02d", i)))
		if err != nil || string(b) != fmt.Sprint(i) {
			t.Errorf("f%02d: %q %v", i, b, err)
		}
	}
	if err := os.WriteFile(filepath.Join(target, "new"), nil, 0o644); err == nil {
		t.Error("a read-only overlay took a new file")
	}
	info, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(info), "\n") {
		if strings.Contains(line, target) {
			t.Logf("%.600s", line)
		}
	}
}
