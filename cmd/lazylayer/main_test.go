package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

func TestWithDiffIDs(t *testing.T) {
	config := `{"architecture":"amd64","config":{"Env":["A=<b>&c"],"Healthcheck":{"Test":["CMD","true"]}},"container_config":{"x":1},` +
		`"history":[{"created_by":"a"},{"created_by":"b","empty_layer":true}],"os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:old"],"extra":true}}`
	ids := []digest.Digest{digest.FromString("new")}
	b, err := withDiffIDs([]byte(config), ids)
	if err != nil {
		t.Fatal(err)
	}
	var got, want map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(config), &want); err != nil {
		t.Fatal(err)
	}
	want["rootfs"].(map[string]any)["diff_ids"] = []any{ids[0].String()}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %s", b)
	}
	if !strings.Contains(string(b), "A=<b>&c") {
		t.Errorf("HTML characters escaped: %s", b)
	}
	for _, bad := range []string{`{"rootfs":{"diff_ids":[]}}`, `{"os":"linux"}`, `[]`, `{"rootfs":{"diff_ids":"x"}}`} {
		if _, err := withDiffIDs([]byte(bad), ids); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
}

func TestHelp(t *testing.T) {
	ctx := t.Context()
	for _, tc := range []struct {
		args       []string
		code       int
		stdout     string // contained
		stderr     string // contained
		wantStdout bool
	}{
		{args: nil, code: 2, stderr: "usage: lazylayer COMMAND"},
		{args: []string{"help"}, code: 0, stdout: "convert    convert"},
		{args: []string{"help", "convert"}, code: 0, stdout: "-zstdchunked"},
		{args: []string{"help", "nope"}, code: 2, stderr: "unknown command \"nope\""},
		{args: []string{"convert", "-h"}, code: 0, stderr: "usage: lazylayer convert [flags] SRC DST"},
		{args: []string{"convert", "--bogus"}, code: 2, stderr: "flag provided but not defined: -bogus"},
		{args: []string{"convert", "a"}, code: 2, stderr: "want SRC and DST, got 1 arguments"},
		{args: []string{"nope"}, code: 2, stderr: "unknown command \"nope\""},
	} {
		var stdout, stderr bytes.Buffer
		c := &cli{stdout: &stdout, stderr: &stderr}
		code := c.exitCode(c.run(ctx, tc.args))
		if code != tc.code || !strings.Contains(stdout.String(), tc.stdout) || !strings.Contains(stderr.String(), tc.stderr) {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit %d, stdout with %q, stderr with %q",
				tc.args, code, stdout.String(), stderr.String(), tc.code, tc.stdout, tc.stderr)
		}
	}
	// An error is reported once, on stderr.
	var stderr bytes.Buffer
	c := &cli{stdout: io.Discard, stderr: &stderr}
	if code := c.exitCode(errors.New("boom")); code != 1 || stderr.String() != "lazylayer: boom\n" {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
}

func TestFormat(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 999: "999 B", 1000: "1.0 kB", 12_345_678: "12.3 MB", 2 << 30: "2.1 GB"} {
		if got := humanSize(n); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", n, got, want)
		}
	}
	d := digest.FromString("x")
	if got := shortDigest(d); got != "sha256:"+d.Encoded()[:12]+"…" {
		t.Errorf("shortDigest = %q", got)
	}
	for in, want := range map[string]string{
		"r.io/a/b":                       "r.io/a/b:latest",
		"r.io/a:1":                       "r.io/a:1",
		"127.0.0.1:5000/a@" + d.String(): "127.0.0.1:5000/a@" + d.String(),
	} {
		spec, err := imageRef(in)
		if err != nil || spec.String() != want {
			t.Errorf("imageRef(%q) = %q, %v; want %q", in, spec.String(), err, want)
		}
	}
}
