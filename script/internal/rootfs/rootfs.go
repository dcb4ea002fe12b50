package rootfs

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// suite is the Debian release the images are built from.
const suite = "bookworm"

// Spec is a Debian root filesystem built once and kept in the cache:
// debootstrap's minbase variant, or a copy of its parent with more packages
// installed by apt-get in a chroot, the way a Dockerfile's RUN line adds a
// layer. Building children from copies keeps the files a step did not
// touch identical, so the difference between parent and child is what
// that step changed.
type Spec struct {
	Name     string
	Parent   string   // "" for debootstrap
	Packages []string // installed on top of Parent
}

func Specs() []Spec {
	return []Spec{
		{Name: "minbase"},
		{Name: "python", Parent: "minbase", Packages: []string{"python3"}},
		{Name: "gcc", Parent: "python", Packages: []string{"gcc", "libc6-dev"}},
	}
}

func Find(name string) (Spec, error) {
	for _, s := range Specs() {
		if s.Name == name {
			return s, nil
		}
	}
	return Spec{}, fmt.Errorf("no root filesystem %q", name)
}

// rootfsDir returns where the root filesystem name is cached.
func Dir(cache, name string) string {
	return filepath.Join(cache, "rootfs", name)
}

// ensureRootfs builds root filesystem name (and its parents) unless the
// cache holds it for the same recipe, and returns its stamp: a digest of
// the recipe and of the parent's stamp, which changes whenever the tree is
// rebuilt.
func Ensure(ctx context.Context, cache, name, mirror string) (string, error) {
	spec, err := Find(name)
	if err != nil {
		return "", err
	}
	recipe := fmt.Sprintf("suite=%s mirror=%s packages=%s", suite, mirror, strings.Join(spec.Packages, ","))
	if spec.Parent != "" {
		parentStamp, err := Ensure(ctx, cache, spec.Parent, mirror)
		if err != nil {
			return "", err
		}
		recipe += " parent=" + parentStamp
	}
	sum := sha256.Sum256([]byte(recipe))
	stamp := hex.EncodeToString(sum[:8])
	dir := Dir(cache, name)
	stampPath := dir + ".stamp"
	if b, err := os.ReadFile(stampPath); err == nil && strings.TrimSpace(string(b)) == stamp {
		if _, err := os.Stat(dir); err == nil {
			return stamp, nil
		}
	}
	start := time.Now()
	fmt.Fprintf(os.Stderr, "building root filesystem %s (%s) in %s\n", name, recipe, dir)
	if err := build(ctx, cache, spec, mirror); err != nil {
		return "", fmt.Errorf("build root filesystem %s: %w", name, err)
	}
	if err := os.WriteFile(stampPath, []byte(stamp+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("write %s: %w", stampPath, err)
	}
	fmt.Fprintf(os.Stderr, "root filesystem %s ready after %s\n", name, time.Since(start).Round(time.Second))
	return stamp, nil
}

// buildRootfs builds spec into a temporary directory next to its place in
// the cache and renames it into place.
func build(ctx context.Context, cache string, spec Spec, mirror string) (err error) {
	dir := Dir(cache, spec.Name)
	tmp := dir + ".tmp"
	if err := removeTree(tmp); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	// debootstrap mounts /proc and /sys in the target and unmounts them
	// when it ends; unmount whatever an interrupted build leaves behind.
	defer func() {
		if uerr := unmountUnder(tmp); uerr != nil && err == nil {
			err = uerr
		}
	}()
	if spec.Parent == "" {
		debs := filepath.Join(cache, "debs")
		if err := os.MkdirAll(debs, 0o755); err != nil {
			return err
		}
		if err := runLogged(ctx, "debootstrap", "--variant=minbase", "--cache-dir="+debs, suite, tmp, mirror); err != nil {
			return err
		}
	} else {
		if err := runLogged(ctx, "cp", "-a", Dir(cache, spec.Parent), tmp); err != nil {
			return err
		}
		if err := aptInstall(ctx, tmp, spec.Packages); err != nil {
			return err
		}
	}
	if err := cleanRootfs(tmp); err != nil {
		return err
	}
	if err := removeTree(dir); err != nil {
		return err
	}
	return os.Rename(tmp, dir)
}

// aptInstall installs packages into the root filesystem at root with
// apt-get in a chroot, using the host's DNS configuration while it runs.
func aptInstall(ctx context.Context, root string, packages []string) error {
	resolv, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return fmt.Errorf("read the host's resolv.conf: %w", err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "resolv.conf"), resolv, 0o644); err != nil {
		return err
	}
	env := []string{"DEBIAN_FRONTEND=noninteractive", "LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	install := append([]string{"apt-get", "install", "-y", "-q", "--no-install-recommends"}, packages...)
	for _, args := range [][]string{{"apt-get", "update", "-q"}, install, {"apt-get", "clean"}} {
		cmd := append([]string{"env", "-i"}, env...)
		cmd = append(cmd, args...)
		if err := runLogged(ctx, "chroot", append([]string{root}, cmd...)...); err != nil {
			return err
		}
	}
	return nil
}

// cleanRootfs removes what image builders remove: the package lists and
// caches, and the host files debootstrap and the build copied in.
func cleanRootfs(root string) error {
	for _, glob := range []string{"var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "etc/resolv.conf", "etc/hostname"} {
		matches, err := filepath.Glob(filepath.Join(root, glob))
		if err != nil {
			return err
		}
		for _, m := range matches {
			if filepath.Base(m) == "partial" || filepath.Base(m) == "lock" {
				continue
			}
			if err := os.RemoveAll(m); err != nil {
				return fmt.Errorf("clean root filesystem: %w", err)
			}
		}
	}
	return nil
}

// debianMirror returns the first Debian archive URI the host's apt sources
// use for the suite, from deb822 .sources files or one-line .list files.
func Mirror() (string, error) {
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	lists, _ := filepath.Glob("/etc/apt/sources.list.d/*.list")
	files = append(append(files, "/etc/apt/sources.list"), lists...)
	for _, f := range files {
		if uri := mirrorIn(f); uri != "" {
			return uri, nil
		}
	}
	return "", errors.New("no apt source for Debian " + suite + " in /etc/apt/sources.list*")
}

// mirrorIn returns the URI of an entry for suite in the apt source file f.
func mirrorIn(f string) string {
	file, err := os.Open(f)
	if err != nil {
		return ""
	}
	defer file.Close()
	var uris, suites []string // of the deb822 stanza being read
	sc := bufio.NewScanner(file)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			if slices.Contains(suites, suite) && len(uris) > 0 {
				return uris[0]
			}
			uris, suites = nil, nil
			continue
		}
		if strings.HasPrefix(line, "#") {
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		switch {
		case ok && strings.EqualFold(key, "URIs"):
			uris = strings.Fields(val)
		case ok && strings.EqualFold(key, "Suites"):
			suites = strings.Fields(val)
		case strings.HasPrefix(line, "deb "):
			// deb [options] URI SUITE COMPONENT...
			rest := strings.TrimSpace(line[len("deb "):])
			if strings.HasPrefix(rest, "[") {
				_, rest, _ = strings.Cut(rest, "]")
			}
			if f := strings.Fields(rest); len(f) >= 2 && f[1] == suite {
				return f[0]
			}
		}
	}
	if slices.Contains(suites, suite) && len(uris) > 0 {
		return uris[0]
	}
	return ""
}

// runLogged runs a long command with its output on stderr.
func runLogged(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return nil
}

// removeTree unmounts anything below dir and removes it.
func removeTree(dir string) error {
	if err := unmountUnder(dir); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// unmountUnder unmounts everything below dir, deepest first.
func unmountUnder(dir string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return err
	}
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, 0); err != nil {
			if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount %s: %w", m.Mountpoint, err)
			}
		}
	}
	return nil
}
