package remote

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestKeyring(t *testing.T) {
	now := time.Unix(1000, 0)
	k := NewKeyring(time.Minute)
	k.now = func() time.Time { return now }
	k.Put("docker.io", "alice", "s3cret")
	k.Put("r.example:5000", "", "refresh-token")
	for _, tc := range []struct {
		host         string
		user, secret string
		ok           bool
	}{
		{host: "registry-1.docker.io", user: "alice", secret: "s3cret", ok: true},
		{host: "index.docker.io", user: "alice", secret: "s3cret", ok: true},
		{host: "R.example:5000", secret: "refresh-token", ok: true},
		{host: "r.example"},
	} {
		c, ok := k.get(tc.host)
		if ok != tc.ok || c.username != tc.user || c.secret != tc.secret {
			t.Errorf("get(%q) = %q, %q, %v; want %q, %q, %v", tc.host, c.username, c.secret, ok, tc.user, tc.secret, tc.ok)
		}
	}
	if n := k.Len(); n != 2 {
		t.Errorf("Len = %d, want 2", n)
	}
	now = now.Add(59 * time.Second)
	k.Put("docker.io", "alice", "s3cret") // the kubelet pulled again
	now = now.Add(2 * time.Second)
	if _, ok := k.get("r.example:5000"); ok {
		t.Error("credentials put 61s ago with a 1m ttl are still there")
	}
	if _, ok := k.get("docker.io"); !ok {
		t.Error("credentials put again 2s ago expired")
	}
	k.Put("docker.io", "", "")
	if _, ok := k.get("docker.io"); ok || k.Len() != 0 {
		t.Errorf("an anonymous pull left credentials behind (%d entries)", k.Len())
	}
	var nilKeyring *Keyring
	if _, ok := nilKeyring.get("docker.io"); ok {
		t.Error("a nil Keyring holds credentials")
	}
}

// tokenRegistry makes reg require a bearer token that its /token endpoint
// hands out for user:pass, as registries behind a token server do.
func tokenRegistry(reg *testRegistry, user, pass string) {
	const token = "tok-" + "12345"
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		if r.URL.Path == "/token" {
			u, p, ok := r.BasicAuth()
			if !ok || u != user || p != pass {
				http.Error(w, "bad credentials", http.StatusUnauthorized)
				return true
			}
			fmt.Fprintf(w, `{"token":%q}`, token)
			return true
		}
		if r.Header.Get("Authorization") != "Bearer "+token {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="test"`, reg.host))
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
			return true
		}
		return false
	})
}

// TestKeyringCredentials: credentials in the Keyring open a registry that
// requires a token, for its own name and for the registry it mirrors (as
// the kubelet's credentials for an image serve the mirrors containerd's
// hosts.toml configures for it); without them the registry refuses.
func TestKeyringCredentials(t *testing.T) {
	reg := newRegistry(t)
	tokenRegistry(reg, "kube", "pull-secret")
	blob, desc := reg.addBlob(3000)
	read := func(t *testing.T, opts Options, ref string) error {
		b, err := NewResolver(opts).Blob(t.Context(), ref, desc)
		if err != nil {
			return err
		}
		rc, err := b.ReadRange(t.Context(), 0, desc.Size)
		if err != nil {
			return err
		}
		defer rc.Close()
		got, err := io.ReadAll(rc)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, blob) {
			t.Fatal("read other bytes than the blob's")
		}
		return nil
	}
	mirrored := func(t *testing.T) Options {
		opts := testOptions(t)
		opts.HostsDir = t.TempDir()
		writeHostsToml(t, opts.HostsDir, "r.example", fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", reg.host, reg.host))
		return opts
	}
	t.Run("none", func(t *testing.T) {
		err := read(t, testOptions(t), reg.host+"/foo:latest")
		if !errors.Is(err, ErrUnauthorized) || !strings.Contains(err.Error(), "401") {
			t.Fatalf("read without credentials: %v, want HTTP 401 (ErrUnauthorized)", err)
		}
	})
	t.Run("wrong", func(t *testing.T) {
		opts := testOptions(t)
		opts.Keyring = NewKeyring(time.Hour)
		opts.Keyring.Put(reg.host, "kube", "wrong")
		if err := read(t, opts, reg.host+"/foo:latest"); err == nil {
			t.Fatal("read with wrong credentials succeeded")
		}
	})
	t.Run("host", func(t *testing.T) {
		opts := testOptions(t)
		opts.Keyring = NewKeyring(time.Hour)
		opts.Keyring.Put(reg.host, "kube", "pull-secret")
		if err := read(t, opts, reg.host+"/foo:latest"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("mirror", func(t *testing.T) {
		opts := mirrored(t)
		opts.Keyring = NewKeyring(time.Hour)
		opts.Keyring.Put("r.example", "kube", "pull-secret")
		if err := read(t, opts, "r.example/foo:latest"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("other registry", func(t *testing.T) {
		opts := mirrored(t)
		opts.Keyring = NewKeyring(time.Hour)
		opts.Keyring.Put("s.example", "kube", "pull-secret")
		if err := read(t, opts, "r.example/foo:latest"); err == nil {
			t.Fatal("credentials for another registry opened this one")
		}
	})
}

// TestHostsHeader: containerd's hosts.toml [host."…".header] table sends
// its headers with every request to that host, so a registry that takes a
// static Authorization header is reached with it.
func TestHostsHeader(t *testing.T) {
	reg := newRegistry(t)
	want := "Basic " + base64.StdEncoding.EncodeToString([]byte("node:static"))
	reg.setMisbehave(func(w http.ResponseWriter, r *http.Request, seen int) bool {
		if r.Header.Get("Authorization") != want {
			http.Error(w, "no", http.StatusForbidden)
			return true
		}
		return false
	})
	_, desc := reg.addBlob(100)
	for _, header := range []bool{false, true} {
		opts := testOptions(t)
		opts.HostsDir = t.TempDir()
		hosts := fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", reg.host, reg.host)
		if header {
			hosts += fmt.Sprintf("  [host.\"http://%s\".header]\n    Authorization = %q\n", reg.host, want)
		}
		writeHostsToml(t, opts.HostsDir, reg.host, hosts)
		b, err := NewResolver(opts).Blob(t.Context(), reg.host+"/foo:latest", desc)
		if err == nil {
			var rc io.ReadCloser
			if rc, err = b.ReadRange(t.Context(), 0, desc.Size); err == nil {
				rc.Close()
			}
		}
		if (err == nil) != header {
			t.Errorf("with the header in hosts.toml: %v; read: %v", header, err)
		}
	}
}
