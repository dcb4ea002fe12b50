package lazy

import (
	"context"
	"runtime"
	"syscall"
	"time"

	"github.com/containerd/log"
)

// Files that nearly every process a container starts reads first, one
// after the other: the ELF interpreter, the loader's cache and the C
// library, before the program's own code runs; and the shell /bin/sh is
// on Debian, Ubuntu and Alpine, which runs shell-form commands (a
// Dockerfile's `CMD cmd args`, Kubernetes' `sh -c`) and entrypoint
// scripts. Each is a round trip of its own when read lazily (python's
// image: 30, 28 and 78 ms at 100 Mbit/s and 20 ms, and 35 ms for dash
// under `sh -c`, on the path to its first output), while the link is idle
// as the layer's metadata tree is built. A layer that has neither an access
// profile nor a prefetch list (those name what the image's containers
// read, these among them) fetches the ones it holds when it is mounted, in
// one round trip, into the chunk cache. Only regular files at these paths
// count: nothing is resolved through the image's symbolic links.
var startFiles = map[string][]string{
	"amd64": {
		"etc/ld.so.cache",
		"usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", // Debian, Ubuntu
		"usr/lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libc.so.6",
		"usr/lib64/ld-linux-x86-64.so.2", "usr/lib64/libc.so.6", // Fedora, RHEL
		"lib/ld-musl-x86_64.so.1",  // Alpine: the interpreter is the C library
		"usr/bin/dash", "bin/dash", // Debian's and Ubuntu's /bin/sh
		"bin/busybox", // Alpine's
	},
	"arm64": {
		"etc/ld.so.cache",
		"usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1", "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
		"usr/lib/aarch64-linux-gnu/libc.so.6", "lib/aarch64-linux-gnu/libc.so.6",
		"usr/lib64/ld-linux-aarch64.so.1", "usr/lib64/libc.so.6",
		"lib/ld-musl-aarch64.so.1",
		"usr/bin/dash", "bin/dash",
		"bin/busybox",
	},
}

// maxStartFile bounds the size of a start file fetched at mount: a C
// library is 1-2 MB.
const maxStartFile = 8 << 20

// fetchStartFiles fetches the start files the layer holds (see startFiles)
// into the chunk cache, unless the layer has an access profile or a
// prefetch list. It counts as on-demand work, which population yields to.
// A failure is logged: the files then load when read.
func (l *Layer) fetchStartFiles(ctx context.Context) {
	if len(l.profile) > 0 || l.ix.prefetchEnd > 0 || l.f.minSpan <= 0 || l.complete.Load() {
		return
	}
	var files []uint32
	for _, p := range startFiles[runtime.GOARCH] {
		num, ok := l.ix.lookupPath(p)
		if !ok {
			continue
		}
		e := &l.ix.entries[num]
		if e.mode&syscall.S_IFMT == syscall.S_IFREG && e.size > 0 && e.size <= maxStartFile {
			files = append(files, num)
		}
	}
	groups := l.f.replayPlan(l.ix, files)
	if len(groups) == 0 {
		return
	}
	start := time.Now()
	entry := log.G(ctx).WithField("layer", l.desc.Digest)
	if err := l.f.fetchGroups(ctx, groups); err != nil {
		if ctx.Err() == nil {
			entry.WithError(err).Debug("fetching the files programs start with failed; they load when read")
		}
		return
	}
	entry.WithFields(log.Fields{
		"files": len(files), "requests": len(groups), "elapsed": time.Since(start).Round(time.Millisecond),
	}).Debug("files programs start with fetched")
}
