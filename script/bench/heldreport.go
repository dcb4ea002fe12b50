package main

import (
	"fmt"
	"slices"
	"strings"
)

// The report's sections on issue 9: the container started lazily, while
// lazy and once local, and the lazy mounts that Prepare makes. An earlier
// results file (-before) gives the figures to compare with.

// nativeRow is one line of the lazy-container table.
type nativeRow struct {
	when, command, cache string
	key                  string  // the held mode's steadyKey
	baseKey              string  // overlayfs' steadyKey
	goal                 float64 // at most this × overlayfs
}

func nativeRows() []nativeRow {
	var out []nativeRow
	for _, c := range []string{"cold", "warm"} {
		out = append(out, nativeRow{"lazy, population held", "find", c, steadyKey("held", "find", c), steadyKey("lazy", "find", c), 1.2})
	}
	for _, what := range []string{"tree", "find"} {
		for _, c := range []string{"cold", "warm"} {
			out = append(out, nativeRow{"its layers turned local", what, c, steadyKey("lazy", what, c), steadyKey("lazy", what, c), 1.1})
		}
	}
	return out
}

// heldModes are r's held modes.
func heldModes(r *results) []modeInfo {
	var out []modeInfo
	for _, m := range r.Modes {
		if m.Held {
			out = append(out, m)
		}
	}
	return out
}

// nativeFigures are one image's figures for one row in one results file.
type nativeFigures struct {
	base, held stat // seconds
	fuse       stat // requests; N == 0 when not counted
	baseOut    stat // what the command printed
	heldOut    stat
}

func (r *results) nativeFigures(image, mode string, row nativeRow) nativeFigures {
	base, held := steadySamples(r, image, baseline), steadySamples(r, image, mode)
	var counted []sample
	for _, s := range held {
		if _, ok := s.FUSE[row.key]; ok {
			counted = append(counted, s)
		}
	}
	return nativeFigures{
		base:    steadyStat(base, row.baseKey),
		held:    steadyStat(held, row.key),
		fuse:    field(counted, func(s sample) float64 { return float64(s.FUSE[row.key]) }),
		baseOut: field(base, func(s sample) float64 { return float64(s.Out[row.baseKey]) }),
		heldOut: field(held, func(s sample) float64 { return float64(s.Out[row.key]) }),
	}
}

func (f nativeFigures) ratio() float64 { return ratio(f.held.Median, f.base.Median) }

func (f nativeFigures) fuseText() string {
	if f.fuse.N == 0 {
		return "not counted"
	}
	return rangeOf(f.fuse, "%.0f")
}

func renderNative(w *strings.Builder, r, before *results) {
	modes := heldModes(r)
	if len(modes) == 0 {
		return
	}
	w.WriteString("### Containers started lazily\n\n")
	w.WriteString("The container started right after the pull, in a held mode: `" + findScript + "` while population is held (every layer lazy), " +
		"then, once population was released and every layer is local, `tar cf - TREE 2>/dev/null | wc -c` and the same find again, " +
		"each with caches dropped first (cold) and run again right after (warm). Against the same commands in the overlayfs container started " +
		"right after its pull in the same run; median seconds over every profile's runs. FUSE requests: what the image's layers' FUSE mounts answered " +
		"while the command ran (the sum of `fuse_requests` in the status socket, median (min–max)); \"not counted\" when the daemon does not count them. " +
		"Printed: what the command printed (bytes, entries) against overlayfs'.")
	if before != nil {
		fmt.Fprintf(w, " Before: the same figures from the run of %s at `%s` (%s).", before.Meta.Date.Format("2006-01-02 15:04 UTC"),
			before.Meta.Versions["lazylayer"], oneLine(before.Meta.Command))
	}
	w.WriteString("\n\n| image | mode | when | command | cache | overlayfs | lazylayer | × overlayfs | goal | FUSE requests | printed |")
	sep := "\n|---|---|---|---|---|---|---|---|---|---|---|"
	if before != nil {
		w.WriteString(" before: × overlayfs | before: FUSE requests |")
		sep += "---|---|"
	}
	w.WriteString(sep + "\n")
	for _, img := range r.Images {
		for _, m := range modes {
			if len(steadySamples(r, img.Name, m.Name)) == 0 {
				continue
			}
			for _, row := range nativeRows() {
				f := r.nativeFigures(img.Name, m.Name, row)
				if f.held.N == 0 {
					continue
				}
				met := "met"
				if f.ratio() > row.goal {
					met = "missed"
				}
				cmd := "find"
				if row.command == "tree" {
					cmd = "tar " + img.Tree
				}
				fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %.3f s | %.3f s | ×%.2f | ≤ %.1f, %s | %s | %s |", img.Name, m.Name, row.when, cmd, row.cache,
					f.base.Median, f.held.Median, f.ratio(), row.goal, met, f.fuseText(), printedText(f))
				if before != nil {
					b := before.nativeFigures(img.Name, m.Name, row)
					bRatio := "–"
					if b.held.N > 0 && b.base.N > 0 {
						bRatio = fmt.Sprintf("×%.2f", b.ratio())
					}
					bFuse := "–"
					if b.held.N > 0 {
						bFuse = b.fuseText()
					}
					fmt.Fprintf(w, " %s | %s |", bRatio, bFuse)
				}
				w.WriteString("\n")
			}
		}
	}
	w.WriteString("\n")
	for _, img := range r.Images {
		for _, m := range modes {
			ss := steadySamples(r, img.Name, m.Name)
			if len(ss) == 0 {
				continue
			}
			native := field(ss, func(s sample) float64 { return float64(s.NativeLayers) })
			bound := field(ss, func(s sample) float64 { return float64(s.FUSEBound) })
			fmt.Fprintf(w, "- %s, %s: %s of %d layers native while population was held; files the running containers held bound to FUSE once local: %s.\n",
				img.Name, m.Name, rangeOf(native, "%.0f"), img.Layers, rangeOf(bound, "%.0f"))
		}
	}
	w.WriteString("\n")
}

// printedText compares what the command printed in the two containers.
func printedText(f nativeFigures) string {
	if f.heldOut.Min == f.heldOut.Max && f.baseOut.Min == f.baseOut.Max && f.heldOut.Median == f.baseOut.Median {
		return "same"
	}
	return fmt.Sprintf("%s vs %s", rangeOf(f.heldOut, "%.0f"), rangeOf(f.baseOut, "%.0f"))
}

// mountSamples are image's successful samples of lazylayer modes that
// pull the converted image, under profile.
func mountSamples(r *results, image, profile string) []sample {
	var out []sample
	for _, m := range r.Modes {
		if m.Snapshotter == "lazylayer" && m.Tag == tagConverted {
			out = append(out, r.selectSamples(image, profile, m.Name)...)
		}
	}
	return out
}

// mountStat summarizes the lazy mount of layer i over ss, in milliseconds,
// and returns its entries.
func mountStat(ss []sample, i int) (stat, int) {
	var v []float64
	entries := 0
	for _, s := range ss {
		for _, m := range s.Mounts {
			if m.Layer == i {
				v = append(v, m.Seconds*1000)
				entries = m.Entries
			}
		}
	}
	return summarize(v), entries
}

func renderMounts(w *strings.Builder, r, before *results) {
	has := false
	for _, s := range r.Samples {
		has = has || len(s.Mounts) > 0
	}
	if !has {
		return
	}
	w.WriteString("### Lazy mounts\n\n")
	w.WriteString("The lazy part of Prepare, per layer of the converted image (modes " + strings.Join(convertedLazyModes(r), ", ") + "): the `elapsed` field of the daemon's " +
		"\"" + mountedMsg + "\" log line, from the layer's blob handle in hand to its mount ready (claiming the TOC read ahead, or reading it; " +
		"building the index; saving the TOC; mounting), median (min–max) milliseconds. Under a shaped profile it includes waiting for the TOC. " +
		"Below the layers, the whole `ctr image pull` (manifest, config and every layer's Prepare, one after another).")
	if before != nil {
		fmt.Fprintf(w, " Before: the run of %s at `%s`.", before.Meta.Date.Format("2006-01-02 15:04 UTC"), before.Meta.Versions["lazylayer"])
	}
	w.WriteString("\n\n| image | layer | entries |")
	sep := "\n|---|---|---|"
	for _, p := range orderedProfiles(r) {
		fmt.Fprintf(w, " %s |", p.Name)
		sep += "---|"
		if before != nil {
			fmt.Fprintf(w, " before, %s |", p.Name)
			sep += "---|"
		}
	}
	w.WriteString(sep + "\n")
	for _, img := range r.Images {
		for i := range img.Layers {
			_, entries := mountStat(mountSamples(r, img.Name, orderedProfiles(r)[0].Name), i)
			fmt.Fprintf(w, "| %s | %d | %d |", img.Name, i+1, entries)
			for _, p := range orderedProfiles(r) {
				st, _ := mountStat(mountSamples(r, img.Name, p.Name), i)
				fmt.Fprintf(w, " %s |", rangeOf(st, "%.0f ms"))
				if before != nil {
					bst, _ := mountStat(mountSamples(before, img.Name, p.Name), i)
					fmt.Fprintf(w, " %s |", rangeOf(bst, "%.0f ms"))
				}
			}
			w.WriteString("\n")
		}
		fmt.Fprintf(w, "| %s | `ctr image pull` | |", img.Name)
		for _, p := range orderedProfiles(r) {
			pull := func(r *results) string {
				return rangeOf(field(mountSamples(r, img.Name, p.Name), func(s sample) float64 { return s.Pull * 1000 }), "%.0f ms")
			}
			fmt.Fprintf(w, " %s |", pull(r))
			if before != nil {
				fmt.Fprintf(w, " %s |", pull(before))
			}
		}
		w.WriteString("\n")
	}
	w.WriteString("\n")
}

// convertedLazyModes names r's lazylayer modes that pull the converted
// image.
func convertedLazyModes(r *results) []string {
	var out []string
	for _, m := range r.Modes {
		if m.Snapshotter == "lazylayer" && m.Tag == tagConverted && !slices.Contains(out, m.Name) {
			out = append(out, m.Name)
		}
	}
	return out
}
