package remote

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// helperTimeout bounds one run of a docker credential helper.
const helperTimeout = 30 * time.Second

// credentialStore finds registry credentials: first in the Keyring (what
// the kubelet sent with its image pulls), then the way docker does, in
// config.json's credHelpers, auths and credsStore. Lookups run in load, where
// a context is at hand; the authorizer's callback, cached, only returns what
// the last load found.
type credentialStore struct {
	dir     string   // directory holding config.json; "" for none
	keyring *Keyring // may be nil

	mu    sync.Mutex            // guards found
	found map[string]credential // registry host → credentials from the last load
}

// credential is a username and secret for the authorizer. An empty username
// with a secret is an identity (refresh) token.
type credential struct{ username, secret string }

// newCredentialStore reads config.json from dir, $DOCKER_CONFIG or ~/.docker.
func newCredentialStore(dir string, keyring *Keyring) *credentialStore {
	if dir == "" {
		dir = os.Getenv("DOCKER_CONFIG")
	}
	if dir == "" {
		if home, err := os.UserHomeDir(); err == nil {
			dir = filepath.Join(home, ".docker")
		}
	}
	return &credentialStore{dir: dir, keyring: keyring, found: make(map[string]credential)}
}

// load looks up the credentials for host and keeps them for cached.
// registry is the registry name of the image the request is for (host
// differs when hosts.toml sends it to a mirror): the keyring's credentials
// for it serve its mirrors too, as containerd's CRI does with the
// credentials of a pull.
func (s *credentialStore) load(ctx context.Context, host, registry string) error {
	c, ok := s.keyring.get(host)
	if !ok && registry != "" {
		c, ok = s.keyring.get(registry)
	}
	if !ok {
		var err error
		if c, err = s.lookup(ctx, host); err != nil {
			return err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.found[host] = c
	return nil
}

// cached returns the credentials the last load found for host, or none. Its
// signature is the one containerd's authorizer calls.
func (s *credentialStore) cached(host string) (string, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.found[host]
	return c.username, c.secret, nil
}

// lookup reads config.json and returns the credentials for host. No config
// file or no entry means anonymous access, not an error.
func (s *credentialStore) lookup(ctx context.Context, host string) (credential, error) {
	if s.dir == "" {
		return credential{}, nil
	}
	name := filepath.Join(s.dir, "config.json")
	b, err := os.ReadFile(name)
	if errors.Is(err, fs.ErrNotExist) {
		return credential{}, nil
	}
	if err != nil {
		return credential{}, fmt.Errorf("read docker config: %w", err)
	}
	var cfg dockerConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return credential{}, fmt.Errorf("parse %s: %w", name, err)
	}
	return cfg.credentials(ctx, host)
}

// dockerConfig is the part of docker's config.json that names credentials.
type dockerConfig struct {
	Auths       map[string]dockerAuth `json:"auths"`
	CredHelpers map[string]string     `json:"credHelpers"`
	CredsStore  string                `json:"credsStore"`
}

// dockerAuth is one entry of config.json's "auths".
type dockerAuth struct {
	Auth          string `json:"auth"` // base64 of "user:password"
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
}

// credentials returns the credentials for host: a per-registry helper first,
// then an auths entry, then the default credential store.
func (c *dockerConfig) credentials(ctx context.Context, host string) (credential, error) {
	key := configKey(host)
	for _, k := range slices.Sorted(maps.Keys(c.CredHelpers)) {
		if configKey(k) == key {
			return runHelper(ctx, c.CredHelpers[k], serverURL(key))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(c.Auths)) {
		if configKey(k) != key {
			continue
		}
		cred, err := c.Auths[k].credential()
		if err != nil {
			return credential{}, fmt.Errorf("auths entry %q: %w", k, err)
		}
		if cred != (credential{}) {
			return cred, nil
		}
		// An empty entry is what docker login leaves when a store holds the secret.
	}
	if c.CredsStore != "" {
		return runHelper(ctx, c.CredsStore, serverURL(key))
	}
	return credential{}, nil
}

func (a dockerAuth) credential() (credential, error) {
	if a.IdentityToken != "" {
		return credential{secret: a.IdentityToken}, nil
	}
	if a.Auth != "" {
		b, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return credential{}, fmt.Errorf("decode auth: %w", err)
		}
		user, pass, ok := strings.Cut(string(b), ":")
		if !ok {
			return credential{}, errors.New("decode auth: not user:password")
		}
		return credential{username: user, secret: pass}, nil
	}
	return credential{username: a.Username, secret: a.Password}, nil
}

// configKey reduces a registry host or a config.json key ("https://host/v1/")
// to a host name; Docker Hub's names all become "index.docker.io".
func configKey(s string) string {
	s = strings.TrimPrefix(strings.TrimPrefix(s, "https://"), "http://")
	s, _, _ = strings.Cut(s, "/")
	s = strings.ToLower(s)
	switch s {
	case "docker.io", "registry-1.docker.io", "index.docker.io":
		return "index.docker.io"
	}
	return s
}

// serverURL is the name credential helpers know a registry by.
func serverURL(key string) string {
	if key == "index.docker.io" {
		return "https://index.docker.io/v1/"
	}
	return key
}

// runHelper runs "docker-credential-<name> get" for server. A helper that has
// no credentials for server means anonymous access.
func runHelper(ctx context.Context, name, server string) (credential, error) {
	if name == "" || strings.ContainsAny(name, `/\`) {
		return credential{}, fmt.Errorf("invalid credential helper name %q", name)
	}
	ctx, cancel := context.WithTimeout(ctx, helperTimeout)
	defer cancel()
	prog := "docker-credential-" + name
	cmd := exec.CommandContext(ctx, prog, "get")
	cmd.Stdin = strings.NewReader(server)
	out, err := cmd.Output()
	if err != nil {
		msg := string(out)
		if ee, ok := errors.AsType[*exec.ExitError](err); ok {
			msg += string(ee.Stderr)
		}
		if strings.Contains(msg, "credentials not found") {
			return credential{}, nil
		}
		return credential{}, fmt.Errorf("%s get %s: %w: %s", prog, server, err, printable(msg))
	}
	var reply struct {
		Username string `json:"Username"`
		Secret   string `json:"Secret"`
	}
	if err := json.Unmarshal(out, &reply); err != nil {
		return credential{}, fmt.Errorf("%s get %s: parse reply: %w", prog, server, err)
	}
	if reply.Username == "<token>" {
		return credential{secret: reply.Secret}, nil
	}
	return credential{username: reply.Username, secret: reply.Secret}, nil
}

// Keyring holds registry credentials handed to the daemon while it runs (by
// the kubelet, through the CRI image-service proxy), per registry host, in
// memory only: nothing of it is written to disk or logged. Each entry
// expires ttl after it was last put, so credentials a pull secret no longer
// grants do not outlive it for long; the kubelet puts them again with every
// pull. A Keyring is safe for concurrent use.
type Keyring struct {
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex              // guards entries
	entries map[string]keyringEntry // configKey(host) → credentials
}

type keyringEntry struct {
	cred    credential
	expires time.Time
}

// NewKeyring returns an empty Keyring whose entries last ttl.
func NewKeyring(ttl time.Duration) *Keyring {
	return &Keyring{ttl: ttl, now: time.Now, entries: make(map[string]keyringEntry)}
}

// Put keeps the credentials for registry host (e.g. "registry.example.com:5000";
// Docker Hub's names are one). An empty username with a secret is an
// identity (refresh) token. Empty credentials remove the entry: the pull
// was anonymous.
func (k *Keyring) Put(host, username, secret string) {
	key := configKey(host)
	k.mu.Lock()
	defer k.mu.Unlock()
	now := k.now()
	for h, e := range k.entries {
		if !now.Before(e.expires) {
			delete(k.entries, h)
		}
	}
	if username == "" && secret == "" {
		delete(k.entries, key)
		return
	}
	k.entries[key] = keyringEntry{cred: credential{username: username, secret: secret}, expires: now.Add(k.ttl)}
}

// Len returns the number of registries the Keyring holds unexpired
// credentials for.
func (k *Keyring) Len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, e := range k.entries {
		if k.now().Before(e.expires) {
			n++
		}
	}
	return n
}

// get returns the unexpired credentials for host. A nil Keyring holds none.
func (k *Keyring) get(host string) (credential, bool) {
	if k == nil {
		return credential{}, false
	}
	key := configKey(host)
	k.mu.Lock()
	defer k.mu.Unlock()
	e, ok := k.entries[key]
	if !ok {
		return credential{}, false
	}
	if !k.now().Before(e.expires) {
		delete(k.entries, key)
		return credential{}, false
	}
	return e.cred, true
}
