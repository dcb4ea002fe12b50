package rootfs

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMirrorIn(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ name, content, want string }{
		{"deb822.sources", "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n" +
			"Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n", "http://mirror.example/debian"},
		{"oneline.list", "# deb http://old.example/debian bullseye main\n" +
			"deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n", "http://mirror.example/debian"},
		{"other.list", "deb http://mirror.example/debian trixie main\n", ""},
	} {
		p := filepath.Join(dir, c.name)
		if err := os.WriteFile(p, []byte(c.content), 0o644); err != nil {
			t.Fatal(err)
		}
		if got := mirrorIn(p); got != c.want {
			t.Errorf("%s: mirror %q, want %q", c.name, got, c.want)
		}
	}
}
