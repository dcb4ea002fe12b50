package testimage

import (
	"fmt"
	"math/rand/v2"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// HostBusybox is the static busybox binary the sample images copy in.
const HostBusybox = "/bin/busybox"

// busyboxApplets are the commands the base layer links to busybox.
func busyboxApplets() []string {
	return []string{
		"sh", "ash", "cat", "ls", "echo", "printf", "sleep", "stat", "test", "[",
		"true", "false", "env", "id", "uname", "mkdir", "rm", "cp", "mv", "ln",
		"touch", "chmod", "chown", "find", "head", "tail", "wc", "dd", "cmp",
		"diff", "od", "hexdump", "xxd", "sha256sum", "md5sum", "readlink",
		"realpath", "grep", "sed", "awk", "sort", "uniq", "tr", "cut", "du",
		"df", "mount", "ps", "date", "sync", "tar", "xargs", "seq", "timeout",
	}
}

// BaseLayer returns the bottom layer of the sample images: a root
// filesystem a container can run "sh -c ..." in. It holds /bin/busybox
// (copied from HostBusybox when the image is pushed), symlinks /bin/<applet>
// -> busybox, /etc/passwd and /etc/group, and the usual empty directories
// (/dev, /proc, /sys, /tmp with the sticky bit, /root, /var, /usr).
func BaseLayer(c Compression) Layer {
	es := []Entry{
		Dir("bin", 0o755),
		BigFile("bin/busybox", 0o755, HostFile(HostBusybox)),
	}
	for _, a := range busyboxApplets() {
		es = append(es, Symlink("bin/"+a, "busybox"))
	}
	es = append(es,
		Dir("dev", 0o755),
		Dir("etc", 0o755),
		File("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
		File("etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\n"),
		File("etc/hostname", 0o644, "lazylayer\n"),
		File("etc/motd", 0o644, "lazylayer test image\n"),
		Dir("proc", 0o555),
		Dir("root", 0o700),
		Dir("sys", 0o555),
		Dir("tmp", 0o1777),
		Dir("usr", 0o755),
		Dir("usr/bin", 0o755),
		Dir("var", 0o755),
	)
	return Layer{Entries: es, Compression: c}
}

func shellConfig() ocispec.ImageConfig {
	return ocispec.ImageConfig{
		Cmd:        []string{"/bin/sh"},
		Env:        []string{"PATH=/usr/bin:/bin"},
		WorkingDir: "/",
	}
}

// Busybox returns a small multi-layer image: BaseLayer (gzip), a zstd layer
// with /etc/os-release and a few files under /srv, then extra. Its command
// is /bin/sh.
func Busybox(extra ...Layer) Image {
	second := Layer{Compression: Zstd, Entries: []Entry{
		Dir("etc", 0o755),
		File("etc/os-release", 0o644, "NAME=lazylayer-busybox\nID=lazylayer\n"),
		Dir("srv", 0o755),
		File("srv/hello.txt", 0o644, "hello from lazylayer\n"),
		BigFile("srv/random-1m", 0o644, Random(1, 1<<20)),
		BigFile("srv/text-256k", 0o644, Text(2, 256<<10)),
	}}
	layers := append([]Layer{BaseLayer(Gzip), second}, extra...)
	return Image{Layers: layers, Config: shellConfig()}
}

// Large returns a measurement image: BaseLayer followed by layers layers of
// generated files totalling about sizeMiB MiB, alternately gzip and zstd.
// Each layer holds a realistic mix under /data/lNN/: mostly small files
// (1-64 KiB), some medium (64 KiB-1 MiB), a few big (1-16 MiB); about 60% of
// the bytes are text-like (compressible), the rest random. The content
// depends only on the arguments.
func Large(sizeMiB, layers int) Image {
	layers = max(layers, 1)
	perLayer := int64(sizeMiB) << 20 / int64(layers)
	img := Image{Layers: []Layer{BaseLayer(Gzip)}, Config: shellConfig()}
	for i := range layers {
		c := Zstd
		if i%2 == 1 {
			c = Gzip
		}
		img.Layers = append(img.Layers, Layer{Compression: c, Entries: largeEntries(i, perLayer)})
	}
	return img
}

// largeEntries returns the entries of layer i of a Large image: files
// totalling budget bytes, 64 to a directory.
func largeEntries(i int, budget int64) []Entry {
	rng := rand.New(rand.NewPCG(uint64(i), 0x6c61726765))
	mtime := DefaultModTime().Add(time.Duration(i) * time.Hour)
	top := fmt.Sprintf("data/l%02d/", i)
	es := []Entry{
		{Name: "data/", Type: TypeDir, Mode: 0o755, ModTime: mtime},
		{Name: top, Type: TypeDir, Mode: 0o755, ModTime: mtime},
	}
	for n := 0; budget > 0; n++ {
		dir := fmt.Sprintf("%sd%03d/", top, n/64)
		if n%64 == 0 {
			es = append(es, Entry{Name: dir, Type: TypeDir, Mode: 0o755, ModTime: mtime})
		}
		var size int64
		switch p := rng.IntN(100); {
		case p < 70:
			size = 1<<10 + rng.Int64N(63<<10)
		case p < 95:
			size = 64<<10 + rng.Int64N(960<<10)
		default:
			size = 1<<20 + rng.Int64N(15<<20)
		}
		size = min(size, budget)
		budget -= size
		seed := uint64(i)<<32 | uint64(n)
		var body Body
		if rng.IntN(100) < 60 {
			body = Text(seed, size)
		} else {
			body = Random(seed, size)
		}
		es = append(es, Entry{
			Name: fmt.Sprintf("%sf%04d", dir, n), Type: TypeReg, Mode: 0o644,
			ModTime: mtime, Body: body,
		})
	}
	return es
}
