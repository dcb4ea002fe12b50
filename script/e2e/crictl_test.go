package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// tokenFront is a registry front that requires a bearer token for the
// repositories under /v2/private/, handed out by its /token endpoint for
// one username and password (by OAuth POST or basic-auth GET, as
// distribution's token servers do). Everything else goes through to
// upstream untouched. It listens on 127.0.0.1.
type tokenFront struct {
	addr     string
	user     string
	password string
	token    string

	granted  atomic.Int64 // tokens handed out
	refused  atomic.Int64 // token requests with wrong or no credentials
	denied   atomic.Int64 // private requests answered 401
	blobGets atomic.Int64 // private blob GETs served with a valid token
}

func startTokenFront(t *testing.T, upstream string) *tokenFront {
	t.Helper()
	f := &tokenFront{user: "kubelet", password: "pw-" + randomHex(t), token: "tok-" + randomHex(t)}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = l.Addr().String()
	proxy := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: upstream})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			f.serveToken(w, r)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/v2/private/") {
			if r.Header.Get("Authorization") != "Bearer "+f.token {
				f.denied.Add(1)
				repo := strings.TrimPrefix(r.URL.Path, "/v2/")
				repo = repo[:strings.LastIndex(repo, "/")]
				repo = strings.TrimSuffix(strings.TrimSuffix(repo, "/blobs"), "/manifests")
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="e2e",scope="repository:%s:pull"`, f.addr, repo))
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusUnauthorized)
				fmt.Fprint(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
				return
			}
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				f.blobGets.Add(1)
			}
		}
		proxy.ServeHTTP(w, r)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return f
}

func (f *tokenFront) serveToken(w http.ResponseWriter, r *http.Request) {
	user, pass, ok := r.BasicAuth()
	if r.Method == http.MethodPost {
		r.ParseForm()
		user, pass, ok = r.PostForm.Get("username"), r.PostForm.Get("password"), r.PostForm.Get("grant_type") == "password"
	}
	if !ok || user != f.user || pass != f.password {
		f.refused.Add(1)
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
		return
	}
	f.granted.Add(1)
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"token": f.token, "access_token": f.token, "expires_in": 300})
}

func randomHex(t *testing.T) string {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// crictl runs the operators' CRI client against the env's containerd, with
// the image service at imageSock.
type crictl struct {
	t      *testing.T
	config string
}

func newCrictl(t *testing.T, dir, runtimeSock, imageSock string) crictl {
	t.Helper()
	bin := filepath.Join(toolsBin, "crictl")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("crictl is not in %s: run script/setup.sh (make test does)", toolsBin)
	}
	config := filepath.Join(dir, "crictl.yaml")
	writeFile(t, config, fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 120\n", runtimeSock, imageSock))
	return crictl{t: t, config: config}
}

func (c crictl) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(toolsBin, "crictl"), append([]string{"--config", c.config}, args...)...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	if err != nil {
		return out.String() + stderr.String(), err
	}
	return out.String(), nil
}

func (c crictl) must(args ...string) string {
	c.t.Helper()
	out, err := c.run(args...)
	if err != nil {
		c.t.Fatalf("crictl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(out)
}

// metricValues scrapes the metrics endpoint with curl, as an operator
// would, and returns each sample's value by its name and labels.
func metricValues(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	out, err := exec.Command("curl", "-sSf", "http://"+addr+"/metrics").CombinedOutput()
	if err != nil {
		t.Fatalf("curl the metrics endpoint: %v\n%s", err, out)
	}
	vals := map[string]float64{}
	for _, line := range strings.Split(string(out), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		vals[line[:i]] = v
	}
	return vals
}

// sumMetric adds the samples of a family whose labels match re.
func sumMetric(vals map[string]float64, family string, re string) float64 {
	m := regexp.MustCompile("^" + regexp.QuoteMeta(family) + re + "$")
	sum := 0.0
	for k, v := range vals {
		if m.MatchString(k) {
			sum += v
		}
	}
	return sum
}

// TestCrictlPullSecret: an operator's path on a Kubernetes node. The
// image is in a repository that needs a bearer token; crictl, like the
// kubelet, pulls it through lazylayer's CRI image-service proxy with the
// pull secret's credentials in PullImage. The same pull without them is
// refused by the registry. With them the image is mounted lazily (no layer
// blob in containerd's content store): lazylayer fetched its layers with
// the credentials the proxy recorded. A pod's container started with
// crictl runp, create and start reads files from it; crictl imagefsinfo
// and rmi work through the proxy. The credentials are nowhere in
// lazylayer's log or root. The metrics endpoint, scraped with curl, shows
// the work done.
func TestCrictlPullSecret(t *testing.T) {
	reg, proxy := startRegistry(t)
	front := startTokenFront(t, proxy.Addr())
	sandbox, dir, hosts := criNode(t, reg.Addr(), front.addr)
	e := newEnvWith(t, reg.Addr(), front.addr, criConfig(t, dir, hosts, sandbox.ref, ""), "[lazy]\n  populate = \"manual\"\n")
	// The CRI proxy needs containerd's socket, known once the env is up:
	// lazylayer starts again with it (and the metrics endpoint) configured.
	criSock := filepath.Join(dir, "cri.sock")
	metricsAddr := freeTCPAddr(t)
	config := filepath.Join(e.dir, "lazylayer.toml")
	b, err := os.ReadFile(config)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, config, fmt.Sprintf("metrics_address = %q\n%s\n[cri]\n  address = %q\n  containerd_address = %q\n  credential_ttl = \"1h\"\n",
		metricsAddr, b, criSock, e.ctrSock))
	e.restartLazylayer(syscall.SIGTERM)
	waitFor(t, "the CRI proxy's socket", func() bool {
		_, err := os.Stat(criSock)
		return err == nil
	})
	if fi, err := os.Stat(criSock); err != nil {
		t.Fatal(err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Fatalf("the CRI proxy's socket has mode %v, want 0600 (pull requests carry secrets)", fi.Mode().Perm())
	}
	src := push(t, reg.Addr(), "e2e/crictl:gzip", sampleImage("crictl"))
	img := e.convert(src, "private/crictl:estargz")
	c := newCrictl(t, dir, e.ctrSock, criSock)

	if v := metricValues(t, metricsAddr); v["lazylayer_cri_credentials"] != 0 {
		t.Fatalf("the proxy holds credentials before any pull: %v", v["lazylayer_cri_credentials"])
	}
	out, err := c.run("pull", img.ref)
	if err == nil {
		t.Fatalf("crictl pull of a private image without credentials succeeded:\n%s", out)
	}
	if front.denied.Load() == 0 {
		t.Fatalf("the pull without credentials failed, but not because the registry refused it: %s", out)
	}
	t.Logf("without credentials: %s", strings.TrimSpace(out))
	if out, err := c.run("inspecti", img.ref); err == nil {
		t.Fatalf("the refused pull left an image behind:\n%s", out)
	}

	proxy.Reset()
	c.must("pull", "--creds", front.user+":"+front.password, img.ref)
	if n := len(e.lazyMounts()); n != len(img.layers) {
		t.Fatalf("after crictl pull, %d lazy FUSE mounts for %d eStargz layers\n%s", n, len(img.layers), e.lazyLogText())
	}
	if held := e.contentHasIn("k8s.io", img); len(held) > 0 {
		t.Errorf("containerd's content store (k8s.io) holds layer blobs %v: containerd pulled them, not lazylayer", held)
	}
	if strings.Contains(e.lazyLogText(), "containerd will pull") {
		t.Errorf("lazylayer fell back to containerd's pull:\n%s", e.lazyLogText())
	}

	podConfig := filepath.Join(dir, "pod.json")
	writeFile(t, podConfig, fmt.Sprintf(`{"metadata":{"name":"crictl","uid":"e2e-crictl-pod","namespace":"e2e","attempt":0},
"log_directory":%q,"linux":{"security_context":{"namespace_options":{"network":2}}}}`, filepath.Join(dir, "logs")))
	ctrConfig := filepath.Join(dir, "container.json")
	writeFile(t, ctrConfig, fmt.Sprintf(`{"metadata":{"name":"app"},"image":{"image":%q},
"command":["sh","-c","cat /hello /srv/hello.txt"],"log_path":"app.log"}`, img.ref))
	pod := c.must("runp", podConfig)
	t.Cleanup(func() {
		c.run("stopp", pod)
		if out, err := c.run("rmp", "-f", pod); err != nil {
			t.Errorf("crictl rmp %s: %v\n%s", pod, err, out)
		}
	})
	app := c.must("create", pod, ctrConfig, podConfig)
	c.must("start", app)
	var inspect struct {
		Status struct {
			State    string `json:"state"`
			ExitCode int    `json:"exitCode"`
			Reason   string `json:"reason"`
		} `json:"status"`
	}
	waitFor(t, "the pod's container to exit", func() bool {
		if err := json.Unmarshal([]byte(c.must("inspect", "-o", "json", app)), &inspect); err != nil {
			t.Fatalf("crictl inspect: %v", err)
		}
		return inspect.Status.State == "CONTAINER_EXITED"
	})
	if inspect.Status.ExitCode != 0 {
		t.Errorf("the container exited with %d (%s)", inspect.Status.ExitCode, inspect.Status.Reason)
	}
	if got, want := criLogText(t, filepath.Join(dir, "logs", "app.log")), "hello from crictl\nhello from lazylayer\n"; got != want {
		t.Errorf("the container printed %q, want %q", got, want)
	}
	served, total := blobBytes(proxy.Stats(), img)
	t.Logf("the registry served %d of %d layer bytes to lazylayer; %d private blob GETs with a token, %d tokens granted, %d refused",
		served, total, front.blobGets.Load(), front.granted.Load(), front.refused.Load())
	if served*2 > total {
		t.Errorf("the registry served %d of %d layer bytes: the 8 MiB file nobody read was fetched", served, total)
	}
	if front.blobGets.Load() == 0 {
		t.Error("no private blob was fetched with a token")
	}

	var fsinfo struct {
		ImageFilesystems []struct {
			FsId      struct{ Mountpoint string } `json:"fsId"`
			UsedBytes struct{ Value string }      `json:"usedBytes"`
		} `json:"imageFilesystems"`
	}
	fsOut := c.must("imagefsinfo", "-o", "json")
	if err := json.Unmarshal([]byte(fsOut), &fsinfo); err != nil || len(fsinfo.ImageFilesystems) == 0 || fsinfo.ImageFilesystems[0].FsId.Mountpoint == "" {
		// crictl prints {"status": {...}} around the reply.
		var wrapped struct{ Status json.RawMessage }
		if json.Unmarshal([]byte(fsOut), &wrapped) == nil && wrapped.Status != nil {
			err = json.Unmarshal(wrapped.Status, &fsinfo)
		}
		if err != nil || len(fsinfo.ImageFilesystems) == 0 || fsinfo.ImageFilesystems[0].FsId.Mountpoint == "" {
			t.Errorf("crictl imagefsinfo printed no image file system (%v):\n%s", err, fsOut)
		}
	}

	// The metrics of this lazy run: scraped while the layers are lazy,
	// then again once they were populated.
	v := metricValues(t, metricsAddr)
	for _, check := range []struct {
		family, labels string
	}{
		{"lazylayer_layers", `\{state="lazy"\}`},
		{"lazylayer_fetched_bytes_total", `\{mode="on_demand"\}`},
		{"lazylayer_fetched_bytes_total", `\{mode="full"\}`}, // the pause image's plain layers
		{"lazylayer_on_demand_read_seconds_count", ``},
		{"lazylayer_fuse_requests_total", `\{op="Open"\}`},
		{"lazylayer_fuse_requests_total", `\{op="Read"\}`},
		{"lazylayer_population_size_bytes", ``},
		{"lazylayer_full_fetch_throughput_bytes_per_second_count", `\{mode="full"\}`},
		{"lazylayer_chunk_cache_bytes", ``},
		{"lazylayer_cri_credentials", ``},
	} {
		if got := sumMetric(v, check.family, check.labels); got <= 0 {
			t.Errorf("metric %s%s is %v after a lazy run, want more than 0", check.family, check.labels, got)
		}
	}
	for _, family := range []string{"lazylayer_fuse_bound_files", "lazylayer_population_held_bytes",
		"lazylayer_chunk_cache_evictions_total"} {
		if _, ok := v[family]; !ok {
			t.Errorf("metrics lack %s", family)
		}
	}
	if got := sumMetric(v, "lazylayer_fallbacks_total", `\{reason="[a-z_]+"\}`); got != 0 {
		t.Errorf("lazylayer_fallbacks_total = %v, want 0", got)
	}
	if out, err := exec.Command(lazylayerBin, "populate", "--address", e.lazySock, "--all", "--wait").CombinedOutput(); err != nil {
		t.Fatalf("lazylayer populate: %v\n%s", err, out)
	}
	v = metricValues(t, metricsAddr)
	for _, check := range []struct{ family, labels string }{
		{"lazylayer_fetched_bytes_total", `\{mode="background"\}`},
		{"lazylayer_full_fetch_throughput_bytes_per_second_count", `\{mode="background"\}`},
		{"lazylayer_layers", `\{state="local"\}`},
	} {
		if got := sumMetric(v, check.family, check.labels); got <= 0 {
			t.Errorf("metric %s%s is %v after population, want more than 0", check.family, check.labels, got)
		}
	}

	c.must("rm", app)
	c.must("inspecti", img.ref)
	c.must("rmi", img.ref)
	if out, err := c.run("inspecti", img.ref); err == nil {
		t.Errorf("crictl rmi left the image:\n%s", out)
	}

	// The secret is nowhere lazylayer writes.
	if strings.Contains(e.lazyLogText(), front.password) || strings.Contains(e.lazyLogText(), front.token) {
		t.Error("lazylayer's log holds the credentials")
	}
	var onDisk []string
	filepath.WalkDir(e.lazyRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err == nil && (bytes.Contains(b, []byte(front.password)) || bytes.Contains(b, []byte(front.token))) {
			onDisk = append(onDisk, path)
		}
		return nil
	})
	if len(onDisk) > 0 {
		t.Errorf("lazylayer's root holds the credentials in %v", onDisk)
	}
}

var freeAddrMu sync.Mutex

// freeTCPAddr returns a 127.0.0.1 address nothing listens on.
func freeTCPAddr(t *testing.T) string {
	freeAddrMu.Lock()
	defer freeAddrMu.Unlock()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}
