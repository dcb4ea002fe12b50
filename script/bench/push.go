package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// The tags every image is pushed under.
const (
	tagGzip      = "gzip"
	tagConverted = "estargz"
)

// pushedImage is an image in the registry, as the cache records it.
type pushedImage struct {
	Name    string
	Key     string // version and root filesystem stamps it was built from
	Digest  string // manifest of the gzip image
	Layers  int
	Size    int64  // compressed bytes of the gzip layers
	BigFile string // largest file, read in the steady-state measurement
	BigSize int64

	Converted     string // manifest under tagConverted
	ConvertedBy   string // converter key: "copy" or "lazylayer-<sha256>"
	ConvertedSize int64

	Prioritized     string // manifest under tagPrioritized
	PrioritizedFrom string // the Converted it was traced from

	SOCI          string // OCI index under tagSOCI
	SOCIFrom      string // the Digest it was built from
	SOCIArtifacts int64  // bytes of its SOCI index manifest and zTOCs
}

// converter makes the lazily loadable variant of an image with
// `lazylayer convert`, or, while that CLI does not exist (or -no-convert),
// pushes the gzip image again under the converted tag.
type converter struct {
	cli      string // "" for copying
	hostsDir string // hosts.toml for the registry's own address
}

// key identifies what conversion produces: a copy, or the output of one
// build of the CLI.
func (c converter) key() (string, error) {
	if c.cli == "" {
		return "copy", nil
	}
	f, err := os.Open(c.cli)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", c.cli, err)
	}
	return "lazylayer-" + hex.EncodeToString(h.Sum(nil))[:16], nil
}

// convert makes registry/repo:tagConverted from registry/repo:tagGzip.
func (c converter) convert(ctx context.Context, reg registryClient, repo string) error {
	if c.cli == "" {
		return reg.copyManifest(ctx, repo, tagGzip, tagConverted)
	}
	src := reg.addr + "/" + repo + ":" + tagGzip
	dst := reg.addr + "/" + repo + ":" + tagConverted
	args := []string{"convert"}
	// The CLI is being written alongside the bench: pass the registry
	// configuration if it takes it.
	if help, _ := exec.CommandContext(ctx, c.cli, "convert", "--help").CombinedOutput(); bytes.Contains(help, []byte("hosts-dir")) {
		args = append(args, "--hosts-dir", c.hostsDir)
	}
	args = append(args, src, dst)
	out, err := exec.CommandContext(ctx, c.cli, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("lazylayer %s: %w: %s", strings.Join(args, " "), err, lastLines(string(out), 10))
	}
	return nil
}

// ensureImage pushes img (and its converted variant) unless the registry
// already holds what the cache says was pushed from the same recipe.
func ensureImage(ctx context.Context, cache string, reg registryClient, conv converter, img benchImage) (pushedImage, error) {
	key := "v" + img.version
	for _, r := range img.rootfs {
		stamp, err := os.ReadFile(rootfsDir(cache, r) + ".stamp")
		if err != nil {
			return pushedImage{}, fmt.Errorf("root filesystem %s is not built: %w", r, err)
		}
		key += " " + r + "=" + strings.TrimSpace(string(stamp))
	}
	recPath := filepath.Join(cache, "images", img.name+".json")
	var rec pushedImage
	if b, err := os.ReadFile(recPath); err == nil {
		json.Unmarshal(b, &rec) // a bad record is rebuilt
	}
	if got, err := reg.manifestDigest(ctx, img.repo(), tagGzip); err != nil {
		return rec, err
	} else if rec.Key != key || got == "" || got != rec.Digest {
		if rec, err = pushImage(ctx, cache, reg, img, key); err != nil {
			return rec, err
		}
	}
	convKey, err := conv.key()
	if err != nil {
		return rec, err
	}
	if got, err := reg.manifestDigest(ctx, img.repo(), tagConverted); err != nil {
		return rec, err
	} else if rec.ConvertedBy != convKey || got == "" || got != rec.Converted {
		start := time.Now()
		if err := conv.convert(ctx, reg, img.repo()); err != nil {
			return rec, fmt.Errorf("convert %s: %w", img.name, err)
		}
		m, dgst, err := reg.manifest(ctx, img.repo(), tagConverted)
		if err != nil {
			return rec, err
		}
		rec.Converted, rec.ConvertedBy, rec.ConvertedSize = dgst, convKey, layersSize(m)
		logf("image %s converted (%s) in %s", img.name, convKey, time.Since(start).Round(time.Second))
	}
	if err := writeJSON(recPath, rec); err != nil {
		return rec, err
	}
	return rec, nil
}

func pushImage(ctx context.Context, cache string, reg registryClient, img benchImage, key string) (pushedImage, error) {
	start := time.Now()
	logf("building and pushing image %s", img.name)
	spec, err := img.build(cache)
	if err != nil {
		return pushedImage{}, fmt.Errorf("build image %s: %w", img.name, err)
	}
	big, bigSize, err := largestFile(spec)
	if err != nil {
		return pushedImage{}, fmt.Errorf("image %s: %w", img.name, err)
	}
	tmp := filepath.Join(cache, "tmp")
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return pushedImage{}, err
	}
	p := testimage.Pusher{TempDir: tmp}
	dgst, layers, err := p.Push(ctx, reg.addr, img.repo()+":"+tagGzip, spec)
	if err != nil {
		return pushedImage{}, fmt.Errorf("push image %s: %w", img.name, err)
	}
	rec := pushedImage{Name: img.name, Key: key, Digest: dgst.String(), Layers: len(layers), BigFile: big, BigSize: bigSize}
	for _, l := range layers {
		rec.Size += l.Size
	}
	logf("image %s pushed: %d layers, %.1f MB compressed, in %s", img.name, rec.Layers, mb(rec.Size), time.Since(start).Round(time.Second))
	return rec, nil
}

func layersSize(m ocispec.Manifest) int64 {
	var n int64
	for _, l := range m.Layers {
		n += l.Size
	}
	return n
}

// registryClient reads and copies manifests over the distribution API.
type registryClient struct {
	addr string // host:port, plain HTTP
	http *http.Client
}

var manifestAccept = strings.Join([]string{ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageIndex,
	"application/vnd.docker.distribution.manifest.v2+json"}, ", ")

// manifestDigest returns the digest of repo:tag, or "" if there is none.
func (r registryClient) manifestDigest(ctx context.Context, repo, tag string) (string, error) {
	resp, err := r.do(ctx, http.MethodHead, repo, tag, nil, "")
	if err != nil {
		return "", err
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		return resp.Header.Get("Docker-Content-Digest"), nil
	case http.StatusNotFound:
		return "", nil
	}
	return "", fmt.Errorf("HEAD manifest %s:%s: %s", repo, tag, resp.Status)
}

// manifest returns repo:tag's image manifest and digest.
func (r registryClient) manifest(ctx context.Context, repo, tag string) (ocispec.Manifest, string, error) {
	var m ocispec.Manifest
	b, mediaType, dgst, err := r.rawManifest(ctx, repo, tag)
	if err != nil {
		return m, "", err
	}
	if mediaType == ocispec.MediaTypeImageIndex {
		return m, "", fmt.Errorf("manifest %s:%s is an index; want an image manifest", repo, tag)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, "", fmt.Errorf("decode manifest %s:%s: %w", repo, tag, err)
	}
	return m, dgst, nil
}

func (r registryClient) rawManifest(ctx context.Context, repo, tag string) (body []byte, mediaType, dgst string, err error) {
	resp, err := r.do(ctx, http.MethodGet, repo, tag, nil, "")
	if err != nil {
		return nil, "", "", err
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, "", "", fmt.Errorf("read manifest %s:%s: %w", repo, tag, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, "", "", fmt.Errorf("GET manifest %s:%s: %s", repo, tag, resp.Status)
	}
	return body, resp.Header.Get("Content-Type"), resp.Header.Get("Docker-Content-Digest"), nil
}

// copyManifest tags repo:from's manifest as repo:to too.
func (r registryClient) copyManifest(ctx context.Context, repo, from, to string) error {
	b, mediaType, _, err := r.rawManifest(ctx, repo, from)
	if err != nil {
		return err
	}
	resp, err := r.do(ctx, http.MethodPut, repo, to, b, mediaType)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return fmt.Errorf("PUT manifest %s:%s: %s: %s", repo, to, resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}

func (r registryClient) do(ctx context.Context, method, repo, tag string, body []byte, contentType string) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	u := fmt.Sprintf("http://%s/v2/%s/manifests/%s", r.addr, repo, tag)
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", manifestAccept)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	c := r.http
	if c == nil {
		c = http.DefaultClient
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, u, err)
	}
	return resp, nil
}

// writeJSON writes v to path through a temporary file.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func mb(n int64) float64 { return float64(n) / 1e6 }
