package meta

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// synthetic returns a layer of dirs directories (a tree with 16 children
// a directory) and files other entries spread over them: mostly non-empty
// regular files, one in 10 empty, one in 30 a symlink, one in 50 with a
// user xattr and one in 500 with security.capability.
//
// Redirects are "/.lazylayer/b/<base-36 number>", short enough for ext4 to
// keep a file's xattrs in its inode; with pathRedirects they are
// "/.lazylayer/12345/<path>" instead.
func synthetic(dirs, files int, pathRedirects bool) []Entry {
	out := make([]Entry, 0, dirs+files)
	names := make([]string, dirs)
	mtime := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	for i := range dirs {
		if i == 0 {
			names[0] = "."
		} else {
			names[i] = filepath.Join(names[(i-1)/16], fmt.Sprintf("dir%d", i))
		}
		out = append(out, Entry{Path: names[i], Mode: modeDir | 0o755, ModTime: mtime})
	}
	for j := range files {
		e := Entry{
			Path:    filepath.Join(names[j%dirs], fmt.Sprintf("file-%d.py", j)),
			Mode:    modeReg | 0o644,
			ModTime: mtime.Add(time.Duration(j) * 7919),
		}
		switch {
		case j%30 == 1:
			e.Mode, e.Linkname = modeLink|0o777, "../elsewhere/"+strconv.Itoa(j)
		case j%10 == 2:
		default:
			e.Size = int64(1 + j%50000)
			e.Redirect = "/" + RedirectRoot + "/b/" + strconv.FormatInt(int64(j), 36)
			if pathRedirects {
				e.Redirect = "/" + RedirectRoot + "/12345/" + e.Path
			}
		}
		if j%50 == 3 {
			e.Xattrs = map[string][]byte{"user.mime_type": []byte("text/x-python")}
		}
		if j%500 == 4 {
			e.Mode |= 0o111
			e.Xattrs = map[string][]byte{"security.capability": capNetRaw}
		}
		out = append(out, e)
	}
	return out
}

// BenchmarkBuild builds layers the size of a typical python image layer and
// of a large one. LAZYLAYER_META_BENCH_DIR chooses the file system,
// LAZYLAYER_META_BENCH_WORKERS how many directories are filled at once.
func BenchmarkBuild(b *testing.B) {
	requireRoot(b)
	workers := runtime.GOMAXPROCS(0)
	if w, err := strconv.Atoi(os.Getenv("LAZYLAYER_META_BENCH_WORKERS")); err == nil {
		workers = w
	}
	for _, c := range []struct {
		name          string
		dirs, files   int
		pathRedirects bool
	}{
		{"8k", 700, 7300, false},
		{"100k", 10000, 90000, false},
		{"100k-path-redirects", 10000, 90000, true},
	} {
		b.Run(fmt.Sprintf("%s/workers=%d", c.name, workers), func(b *testing.B) {
			entries := synthetic(c.dirs, c.files, c.pathRedirects)
			base := os.Getenv("LAZYLAYER_META_BENCH_DIR")
			if base == "" {
				base = b.TempDir()
			}
			var cpu time.Duration
			var built []string
			b.ResetTimer()
			for i := range b.N {
				dst := filepath.Join(base, fmt.Sprintf("meta-bench-%d", i))
				start, before := time.Now(), cpuTime(b)
				if err := build(b.Context(), dst, entries, workers); err != nil {
					b.Fatal(err)
				}
				used := cpuTime(b) - before
				cpu += used
				built = append(built, dst)
				b.Logf("build %d: %v, %v CPU", i, time.Since(start).Round(time.Millisecond), used)
			}
			b.StopTimer()
			// Trees are removed only now: on ext4 without a journal the
			// inode allocator skips inodes freed in the last minute, which
			// makes a build right after a removal many times slower.
			disk := diskUsage(b, built[0])
			for _, dst := range built {
				if err := os.RemoveAll(dst); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(disk)/(1<<20), "MiB-on-disk")
			b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms/op")
			b.ReportMetric(float64(len(entries))*float64(b.N)/b.Elapsed().Seconds(), "entries/s")
		})
	}
}

// diskUsage is the space the tree at dir takes: its blocks, xattr blocks
// included, counting each inode once.
func diskUsage(b *testing.B, dir string) int64 {
	seen := map[uint64]bool{}
	var total int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		if !seen[st.Ino] {
			seen[st.Ino] = true
			total += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return total
}

// cpuTime is the CPU time the process has used, user and system.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
