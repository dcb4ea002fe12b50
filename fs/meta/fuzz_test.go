package meta

import (
	"strings"
	"syscall"
	"testing"
)

// FuzzPlan feeds plan arbitrary layers: names, kinds, links and redirects
// from the fuzzer. plan must not panic, and a tree it accepts must be one
// Build can write without leaving the root: clean relative paths whose
// parents are directories of the tree and redirects under RedirectRoot.
func FuzzPlan(f *testing.F) {
	f.Add("a\nb/c\na/b\n..\n/etc", []byte{0, 1, 2, 3, 4}, "a/b", "/.lazylayer/k/1")
	f.Add("a\na/b\nl\nl/x", []byte{0, 1, 2, 1}, "a", "/.lazylayer/../x")
	f.Add(".lazylayer\nd\nd/e", []byte{0, 0, 1}, "d/e", "/.lazylayer/k/2")
	f.Fuzz(func(t *testing.T, paths string, kinds []byte, link, redirect string) {
		var entries []Entry
		for i, p := range strings.Split(paths, "\n") {
			k := byte(0)
			if i < len(kinds) {
				k = kinds[i]
			}
			e := Entry{Path: p}
			switch k % 5 {
			case 0:
				e.Mode = modeDir | 0o755
			case 1:
				e.Mode, e.Size, e.Redirect = modeReg|0o644, 1, redirect+strings.Repeat("/x", i)
			case 2:
				e.Mode, e.Linkname = modeLink|0o777, "/etc"
			case 3:
				e.Link = link
			case 4:
				e.Mode = syscall.S_IFCHR
			}
			entries = append(entries, e)
		}
		tr, err := plan(entries)
		if err != nil {
			return
		}
		for i, n := range tr.nodes {
			if i == 0 {
				continue
			}
			if err := checkPath(n.e.Path); err != nil || strings.Contains("/"+n.e.Path+"/", "/../") {
				t.Fatalf("accepted path %q", n.e.Path)
			}
			if !tr.isDir(n.parent) {
				t.Fatalf("%q: parent is not a directory", n.e.Path)
			}
			if n.e.Link == "" && n.e.Redirect != "" && checkRedirect(n.e.Redirect) != nil {
				t.Fatalf("%q: accepted redirect %q", n.e.Path, n.e.Redirect)
			}
			if n.target >= 0 && tr.isDir(n.target) {
				t.Fatalf("%q: hard link to a directory", n.e.Path)
			}
		}
	})
}
