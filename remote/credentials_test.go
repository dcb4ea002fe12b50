package remote

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"testing"
)

func TestCredentials(t *testing.T) {
	bin := t.TempDir()
	writeHelper(t, bin, "fake", `server=$(cat)
case "$server" in
https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"hubuser","Secret":"hubpass"}' ;;
helped.example) echo '{"Username":"<token>","Secret":"idtok"}' ;;
*) echo "credentials not found in native keychain"; exit 1 ;;
esac`)
	writeHelper(t, bin, "broken", `echo boom >&2; exit 2`)
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))

	basic := base64.StdEncoding.EncodeToString([]byte("alice:pa:ss"))
	for _, tc := range []struct {
		name    string
		config  string // "" for no config.json
		host    string
		user    string
		secret  string
		wantErr bool
	}{
		{name: "no config", host: "r.example"},
		{name: "auth", config: `{"auths":{"r.example:5000":{"auth":"` + basic + `"}}}`, host: "r.example:5000", user: "alice", secret: "pa:ss"},
		{name: "url key", config: `{"auths":{"https://R.example/v2/":{"auth":"` + basic + `"}}}`, host: "r.example", user: "alice", secret: "pa:ss"},
		{name: "other host", config: `{"auths":{"r.example":{"auth":"` + basic + `"}}}`, host: "s.example"},
		{name: "username", config: `{"auths":{"r.example":{"username":"bob","password":"pw"}}}`, host: "r.example", user: "bob", secret: "pw"},
		{name: "identity token", config: `{"auths":{"r.example":{"auth":"` + basic + `","identitytoken":"tok"}}}`, host: "r.example", secret: "tok"},
		{name: "docker hub", config: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + basic + `"}}}`, host: "registry-1.docker.io", user: "alice", secret: "pa:ss"},
		{name: "docker.io", config: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + basic + `"}}}`, host: "docker.io", user: "alice", secret: "pa:ss"},
		{name: "bad auth", config: `{"auths":{"r.example":{"auth":"!!"}}}`, host: "r.example", wantErr: true},
		{name: "auth without colon", config: `{"auths":{"r.example":{"auth":"` + base64.StdEncoding.EncodeToString([]byte("alice")) + `"}}}`, host: "r.example", wantErr: true},
		{name: "bad json", config: `{"auths":`, host: "r.example", wantErr: true},
		{name: "cred helper", config: `{"credHelpers":{"helped.example":"fake"}}`, host: "helped.example", secret: "idtok"},
		{name: "creds store", config: `{"auths":{"https://index.docker.io/v1/":{}},"credsStore":"fake"}`, host: "registry-1.docker.io", user: "hubuser", secret: "hubpass"},
		{name: "creds store without entry", config: `{"credsStore":"fake"}`, host: "registry-1.docker.io", user: "hubuser", secret: "hubpass"},
		{name: "creds store not found", config: `{"credsStore":"fake"}`, host: "r.example"},
		{name: "helper before auths", config: `{"auths":{"helped.example":{"auth":"` + basic + `"}},"credHelpers":{"helped.example":"fake"}}`, host: "helped.example", secret: "idtok"},
		{name: "broken helper", config: `{"credHelpers":{"r.example":"broken"}}`, host: "r.example", wantErr: true},
		{name: "missing helper", config: `{"credsStore":"nosuchhelper"}`, host: "r.example", wantErr: true},
		{name: "helper path", config: `{"credsStore":"../fake"}`, host: "r.example", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.config != "" {
				if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(tc.config), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			s := newCredentialStore(dir, nil)
			err := s.load(t.Context(), tc.host, "")
			if tc.wantErr {
				if err == nil {
					t.Fatal("no error")
				}
				t.Log(err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			user, secret, _ := s.cached(tc.host)
			if user != tc.user || secret != tc.secret {
				t.Errorf("got %q, %q; want %q, %q", user, secret, tc.user, tc.secret)
			}
		})
	}
}

func writeHelper(t *testing.T, dir, name, script string) {
	t.Helper()
	p := filepath.Join(dir, "docker-credential-"+name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+script+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
}
