package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseMounts(t *testing.T) {
	log := `time="2026-12-05T12:00:00.1Z" level=info msg="lazylayer-snapshotter serving" address=/run/x.sock
time="2026-12-05T12:00:01.2Z" level=info msg="layer mounted lazily" elapsed=41ms entries=5321 layer="sha256:bbb"
time="2026-12-05T12:00:01.3Z" level=info msg="layer mounted lazily" elapsed=1.5s entries=7 layer=sha256-unquoted
time="2026-12-05T12:00:01.4Z" level=warning msg="a \"quoted\" message" error="x=y z"
time="2026-12-05T12:00:01.5Z" level=info msg="layer mounted lazily" elapsed=3µs entries=1 layer="sha256:aaa"
`
	got, err := parseMounts(strings.NewReader(log), []string{"sha256:aaa", "sha256:bbb"})
	if err != nil {
		t.Fatal(err)
	}
	want := []lazyMount{
		{Layer: 1, Digest: "sha256:bbb", Entries: 5321, Seconds: 0.041},
		{Layer: -1, Digest: "sha256-unquoted", Entries: 7, Seconds: 1.5},
		{Layer: 0, Digest: "sha256:aaa", Entries: 1, Seconds: 3e-6},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseMounts =\n%+v\nwant\n%+v", got, want)
	}
}

func TestLogFields(t *testing.T) {
	got := logFields(`time="t" level=warning msg="a \"quoted\" message" error="x=y z" n=3`)
	want := map[string]string{"time": "t", "level": "warning", "msg": `a "quoted" message`, "error": "x=y z", "n": "3"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("logFields = %q, want %q", got, want)
	}
}

// TestLocalWatch: the watch counts distinct layers logged as local, across
// polls that end in the middle of a line.
func TestLocalWatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lazylayer.log")
	w := localWatch{path: path, layers: map[string]bool{}}
	if _, err := w.poll(); err == nil {
		t.Error("a missing log polled without error")
	}
	steps := []struct {
		add  string
		want int
	}{
		{`time="t" level=info msg="layer mounted lazily" layer="sha256:aaa"` + "\n", 0},
		{`time="t" level=info msg="layer is local" elapsed=1s layer="sha256:a`, 0},
		{`aa" size=3` + "\n" + `time="t" level=debug msg="not the layer is local message" layer="sha256:bbb"` + "\n", 1},
		{`time="t" level=info msg="layer is local" layer="sha256:aaa"` + "\n", 1},
		{`time="t" level=info msg="layer is local" layer="sha256:bbb"` + "\n", 2},
	}
	for i, s := range steps {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(s.add)
		f.Close()
		n, err := w.poll()
		if err != nil || n != s.want {
			t.Errorf("step %d: %d layers local (%v), want %d", i, n, err, s.want)
		}
	}
}
