package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// generatedMarker separates the hand-written part of benchmarks.md, which
// the bench keeps, from the part it writes.
const generatedMarker = "<!-- Everything below this line is written by `make bench` (script/bench). Edit above it. -->"

// baseline is the mode the others are compared with.
const baseline = "overlayfs"

// writeDocs renders r into dir/benchmarks.md and its charts into
// dir/bench/*.png (replacing the old ones). The hand-written header above
// generatedMarker is kept; a new file gets the header of headerFrom (the
// repository's docs/benchmarks.md). before, if not nil, is an earlier
// run whose figures on lazily started containers and lazy mounts are
// shown next to r's.
func writeDocs(dir, headerFrom string, r, before *results) error {
	mdPath := filepath.Join(dir, "benchmarks.md")
	header := "# Benchmarks\n\n"
	for _, p := range []string{headerFrom, mdPath} {
		if b, err := os.ReadFile(p); err == nil {
			if i := bytes.Index(b, []byte(generatedMarker)); i >= 0 {
				b = b[:i]
			}
			header = string(b)
		}
	}
	chartDir := filepath.Join(dir, "bench")
	if err := os.MkdirAll(chartDir, 0o755); err != nil {
		return err
	}
	old, _ := filepath.Glob(filepath.Join(chartDir, "*.png"))
	for _, f := range old {
		os.Remove(f)
	}
	charts, err := writeCharts(chartDir, r)
	if err != nil {
		return err
	}
	var md strings.Builder
	md.WriteString(header)
	md.WriteString(generatedMarker + "\n\n")
	renderReport(&md, r, before, charts)
	if err := os.WriteFile(mdPath, []byte(md.String()), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", mdPath, err)
	}
	logf("wrote %s and %d charts in %s", mdPath, len(charts), chartDir)
	return nil
}

// chartRefs maps a chart's kind and image ("coldstart/python") to its
// path relative to benchmarks.md.
type chartRefs map[string]string

func writeCharts(dir string, r *results) (chartRefs, error) {
	refs := chartRefs{}
	for _, img := range r.Images {
		if c, ok := coldStartChart(r, img.Name); ok {
			name := "coldstart-" + img.Name + ".png"
			if err := c.save(filepath.Join(dir, name)); err != nil {
				return nil, err
			}
			refs["coldstart/"+img.Name] = "bench/" + name
		}
		if c, ok := steadyChart(r, img.Name); ok {
			name := "steady-" + img.Name + ".png"
			if err := c.save(filepath.Join(dir, name)); err != nil {
				return nil, err
			}
			refs["steady/"+img.Name] = "bench/" + name
		}
	}
	return refs, nil
}

func coldStartChart(r *results, image string) (barChart, bool) {
	c := barChart{title: image + ": cold start (ctr image pull to the first output line)", ylabel: "seconds, median; whiskers min–max", format: "%.1f"}
	for _, p := range r.Profiles {
		c.groups = append(c.groups, p.Name)
	}
	any := false
	for i, m := range r.Modes {
		s := barSeries{name: m.Name, color: i}
		for _, p := range r.Profiles {
			st := field(r.selectSamples(image, p.Name, m.Name), func(s sample) float64 { return s.ColdStart })
			s.values, s.lows, s.highs = append(s.values, st.Median), append(s.lows, st.Min), append(s.highs, st.Max)
			any = any || st.N > 0
		}
		c.series = append(c.series, s)
	}
	return c, any
}

// steadyMeasures are the steady-state measurements in report order.
func steadyMeasures() []struct{ key, label string } {
	var out []struct{ key, label string }
	for _, ct := range []string{"lazy", "local"} {
		for _, what := range []string{"file", "tree"} {
			for _, cache := range []string{"cold", "warm"} {
				out = append(out, struct{ key, label string }{steadyKey(ct, what, cache), ct + " " + what + "\n" + cache})
			}
		}
	}
	return out
}

// steadySamples are image's samples with steady-state measurements for
// mode, from every profile: they run once the image is local, when the
// network no longer matters.
func steadySamples(r *results, image, mode string) []sample {
	var out []sample
	for _, p := range r.Profiles {
		for _, s := range r.selectSamples(image, p.Name, mode) {
			if len(s.Steady) > 0 {
				out = append(out, s)
			}
		}
	}
	return out
}

func steadyChart(r *results, image string) (barChart, bool) {
	base := steadySamples(r, image, baseline)
	c := barChart{title: image + ": steady-state reads, time relative to overlayfs", ylabel: "median time / overlayfs median", refLine: 1, format: "%.2f"}
	for _, m := range steadyMeasures() {
		c.groups = append(c.groups, m.label)
	}
	any := false
	for i, m := range r.Modes {
		if m.Name == baseline {
			continue
		}
		ss := steadySamples(r, image, m.Name)
		if len(ss) == 0 || len(base) == 0 {
			continue
		}
		s := barSeries{name: m.Name, color: i}
		for _, sm := range steadyMeasures() {
			s.values = append(s.values, ratio(steadyStat(ss, sm.key).Median, steadyStat(base, sm.key).Median))
		}
		c.series = append(c.series, s)
		any = true
	}
	return c, any
}

func steadyStat(ss []sample, key string) stat {
	return field(ss, func(s sample) float64 { return s.Steady[key] })
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// fewerRuns names the images measured fewer times than the options said,
// as " (synthetic: 3)", or returns "".
func fewerRuns(r *results) string {
	var out []string
	for _, img := range r.Images {
		n := 0
		for _, s := range r.Samples {
			if s.Image == img.Name {
				n = max(n, s.Run)
			}
		}
		if n > 0 && n < r.Meta.Runs {
			out = append(out, fmt.Sprintf("%s: %d", img.Name, n))
		}
	}
	if len(out) == 0 {
		return ""
	}
	return " (" + strings.Join(out, ", ") + ")"
}

// renderReport writes the generated part of benchmarks.md.
func renderReport(w *strings.Builder, r, before *results, charts chartRefs) {
	m := r.Meta
	fmt.Fprintf(w, "## Results of %s\n\n", m.Date.Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(w, "`%s`, %d run(s) per image, profile and mode%s, each from cold; took %s.", m.Command, m.Runs, fewerRuns(r), m.Duration)
	if m.Quick {
		w.WriteString(" This is a **quick** run (fewer images and runs), for development.")
	}
	w.WriteString("\n\n")
	renderSetup(w, r)
	renderImages(w, r)
	for _, p := range orderedProfiles(r) {
		renderColdStart(w, r, p)
	}
	for _, img := range r.Images {
		if ref, ok := charts["coldstart/"+img.Name]; ok {
			fmt.Fprintf(w, "![%s: cold start](%s)\n", img.Name, ref)
		}
	}
	w.WriteString("\n")
	renderDaemons(w, r)
	renderSteady(w, r, charts)
	renderNative(w, r, before)
	renderMounts(w, r, before)
	if f := r.failures(); len(f) > 0 {
		w.WriteString("### Failed runs\n\nThese runs are left out of every figure above.\n\n")
		for _, s := range f {
			fmt.Fprintf(w, "- %s, %s, %s, run %d: `%s`\n", s.Image, s.Profile, s.Mode, s.Run, oneLine(s.Error))
		}
		w.WriteString("\n")
	}
}

// orderedProfiles puts the headline profile first.
func orderedProfiles(r *results) []profileInfo {
	ps := slices.Clone(r.Profiles)
	slices.SortStableFunc(ps, func(a, b profileInfo) int {
		switch {
		case a.Name == headlineProfile && b.Name != headlineProfile:
			return -1
		case b.Name == headlineProfile && a.Name != headlineProfile:
			return 1
		}
		return 0
	})
	return ps
}

func renderSetup(w *strings.Builder, r *results) {
	m := r.Meta
	var busy []float64
	noisy := 0
	for _, s := range r.Samples {
		busy = append(busy, s.Busy*100)
		if s.Busy >= busyThreshold {
			noisy++
		}
	}
	b := summarize(busy)
	w.WriteString("| | |\n|---|---|\n")
	row := func(k, v string) { fmt.Fprintf(w, "| %s | %s |\n", k, v) }
	row("Machine", fmt.Sprintf("%s, %d cores, %.0f GB RAM (%s)", m.CPU, m.Cores, m.MemoryGB, m.Host))
	row("System", fmt.Sprintf("%s, kernel %s", m.OS, m.Kernel))
	if m.Disk != "" {
		row("Daemons' state on", m.Disk)
	}
	for _, k := range []string{"lazylayer", "lazylayer-snapshotter binary", "containerd", "runc", "docker-registry", "go (bench)"} {
		row(k, "`"+m.Versions[k]+"`")
	}
	row("lazylayer settings", m.Fetch)
	row("Fully local", m.LocalSignal)
	row("Load average", fmt.Sprintf("%s at the start, %s at the end", m.LoadStart, m.LoadEnd))
	row("Others' CPU use", fmt.Sprintf("median %.0f%%, at most %.0f%% in the second before a run; %d of %d runs started above %.0f%%",
		b.Median, b.Max, noisy, len(r.Samples), busyThreshold*100))
	w.WriteString("\n")
	for _, n := range m.Notes {
		fmt.Fprintf(w, "- %s\n", n)
	}
	if len(m.Notes) > 0 {
		w.WriteString("\n")
	}
	w.WriteString("| mode | what |\n|---|---|\n")
	for _, md := range r.Modes {
		fmt.Fprintf(w, "| %s | %s |\n", md.Name, md.About)
	}
	w.WriteString("\n| profile | what | measured rate | measured round trip |\n|---|---|---|---|\n")
	for _, p := range r.Profiles {
		fmt.Fprintf(w, "| %s | %s | %.0f Mbit/s | %.1f ms |\n", p.Name, p.About, p.MeasuredMbit, float64(p.MeasuredRTT)/1e6)
	}
	w.WriteString("\n")
}

func renderImages(w *strings.Builder, r *results) {
	w.WriteString("### Images\n\n| image | what | layers | gzip | converted | workload (prints `hi`) | largest file |\n|---|---|---|---|---|---|---|\n")
	for _, img := range r.Images {
		conv := fmt.Sprintf("%.1f MB", mb(img.ConvertedSize))
		if img.ConvertedBy == "copy" {
			conv += " (copy of gzip)"
		}
		fmt.Fprintf(w, "| %s | %s | %d | %.1f MB | %s | `%s` | `%s`, %.1f MB |\n", img.Name, img.About, img.Layers,
			mb(img.Size), conv, mdCode(img.ColdCmd), img.BigFile, mb(img.BigSize))
	}
	w.WriteString("\n")
}

func renderColdStart(w *strings.Builder, r *results, p profileInfo) {
	title := "Cold start, " + p.Name
	if p.Name == headlineProfile {
		title += " (headline)"
	}
	fmt.Fprintf(w, "### %s\n\n", title)
	w.WriteString("Seconds from `ctr image pull` to the container's first output line, and until the image is fully local: median (min–max), and the median's ratio to overlayfs'. " +
		"Fetched: what the registry side sent (headers and bodies) before the first output line, and the requests it received; " +
		"in all: what it sent until the image was fully local, as a share of the image's layer bytes (the gzip image's for overlayfs and lazylayer, " +
		"the converted image's for the eStargz modes; the prioritized image holds the same files, converted again). " +
		"A held mode's image turns local only when the bench releases population, after measuring: its time to local is not shown.\n\n")
	w.WriteString("| image | mode | cold start | × overlayfs | fetched before output | requests | fully local | × overlayfs | fetched in all |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, img := range r.Images {
		base := r.selectSamples(img.Name, p.Name, baseline)
		baseCold := field(base, func(s sample) float64 { return s.ColdStart })
		baseLocal := field(base, func(s sample) float64 { return s.Local })
		for _, m := range r.Modes {
			ss := r.selectSamples(img.Name, p.Name, m.Name)
			if len(ss) == 0 {
				continue
			}
			cold := field(ss, func(s sample) float64 { return s.ColdStart })
			local := field(ss, func(s sample) float64 { return s.Local })
			bytes := field(ss, func(s sample) float64 { return mb(s.FirstBytes) })
			reqs := field(ss, func(s sample) float64 { return float64(s.FirstRequests) })
			all := field(ss, func(s sample) float64 { return float64(s.LocalBytes) })
			size := img.Size
			if (m.Tag == tagConverted || m.Tag == tagPrioritized) && img.ConvertedSize > 0 {
				size = img.ConvertedSize
			}
			localText, localTimes := secs(local), times(local.Median, baseLocal.Median, m.Name)
			if m.Held {
				localText, localTimes = "held", ""
			}
			if n := countLocalFrom(ss, "never"); n > 0 {
				localText += fmt.Sprintf(", %d of %d never", n, len(ss))
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s | %.1f MB | %.0f | %s | %s | %.1f MB (%.1f%%) |\n", img.Name, m.Name, secs(cold),
				times(cold.Median, baseCold.Median, m.Name), bytes.Median, reqs.Median, localText, localTimes,
				mb(int64(all.Median)), 100*all.Median/float64(size))
		}
	}
	w.WriteString("\n")
}

func renderDaemons(w *strings.Builder, r *results) {
	w.WriteString("### Daemons\n\nPeak RSS (VmHWM, each daemon started afresh for every run) and CPU seconds from the pull's start until the image was fully local: median (min–max).\n\n")
	w.WriteString("The snapshotter is the mode's remote snapshotter daemon: stargz-snapshotter's or soci-snapshotter's in their modes, " +
		"lazylayer's in the others (idle in overlayfs').\n\n")
	w.WriteString("| image | profile | mode | containerd RSS | snapshotter RSS | containerd CPU | snapshotter CPU |\n|---|---|---|---|---|---|---|\n")
	for _, img := range r.Images {
		for _, p := range orderedProfiles(r) {
			for _, m := range r.Modes {
				ss := r.selectSamples(img.Name, p.Name, m.Name)
				if len(ss) == 0 {
					continue
				}
				rss := func(d string) stat { return field(ss, func(s sample) float64 { return mb(s.Daemons[d].PeakRSS) }) }
				cpu := func(d string) stat { return field(ss, func(s sample) float64 { return s.Daemons[d].CPULocal }) }
				sn := snapshotterDaemon(m.Snapshotter)
				fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n", img.Name, p.Name, m.Name,
					rangeOf(rss("containerd"), "%.0f MB"), rangeOf(rss(sn), "%.0f MB"),
					rangeOf(cpu("containerd"), "%.2f s"), rangeOf(cpu(sn), "%.2f s"))
			}
		}
	}
	w.WriteString("\n")
}

func renderSteady(w *strings.Builder, r *results, charts chartRefs) {
	has := false
	for _, s := range r.Samples {
		has = has || len(s.Steady) > 0
	}
	if !has {
		return
	}
	w.WriteString("### Steady state\n\n")
	w.WriteString("Inside a container once the image is fully local: `dd` of the image's largest file to /dev/null (file) and `tar cf - TREE | wc -c` (tree; " +
		"GNU tar does not read file data when writing to /dev/null), with caches dropped first (cold) and right after (warm; a small file is read " +
		"repeatedly, at least 256 MiB in all, and the time is per read). " +
		"find: `" + findScript + "`. " +
		"\"lazy\" is the container started right after the pull, \"local\" one started once the image was local; \"held\" is, in a held mode, " +
		"the lazy container before population was released (find only). " +
		"Median seconds over every profile's runs, and the ratio to overlayfs' median (its lazy container's for held).\n\n")
	w.WriteString("| image | mode | container | file, cold | file, warm | tree, cold | tree, warm | find, cold | find, warm |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, img := range r.Images {
		base := steadySamples(r, img.Name, baseline)
		for _, m := range r.Modes {
			ss := steadySamples(r, img.Name, m.Name)
			if len(ss) == 0 {
				continue
			}
			containers := []string{"lazy", "local"}
			if m.Held {
				containers = []string{"held", "lazy", "local"}
			}
			for _, ct := range containers {
				fmt.Fprintf(w, "| %s | %s | %s |", img.Name, m.Name, ct)
				for _, what := range steadyWhats() {
					for _, cache := range []string{"cold", "warm"} {
						k := steadyKey(ct, what, cache)
						st := steadyStat(ss, k)
						if st.N == 0 || st.Median == 0 {
							w.WriteString(" – |")
							continue
						}
						baseKey := k
						if ct == "held" {
							baseKey = steadyKey("lazy", what, cache)
						}
						fmt.Fprintf(w, " %.3f s %s |", st.Median, times(st.Median, steadyStat(base, baseKey).Median, m.Name))
					}
				}
				w.WriteString("\n")
			}
		}
	}
	w.WriteString("\n")
	for _, img := range r.Images {
		if ref, ok := charts["steady/"+img.Name]; ok {
			fmt.Fprintf(w, "![%s: steady state](%s)\n", img.Name, ref)
		}
	}
	w.WriteString("\n")
}

func secs(s stat) string { return rangeOf(s, "%.2f s") }

// rangeOf formats a median and its range with format.
func rangeOf(s stat, format string) string {
	if s.N == 0 {
		return "–"
	}
	med := fmt.Sprintf(format, s.Median)
	if s.N == 1 {
		return med
	}
	unit := ""
	if i := strings.LastIndexByte(format, ' '); i >= 0 {
		format, unit = format[:i], format[i:]
	}
	return fmt.Sprintf("%s (%s–%s%s)", med, fmt.Sprintf(format, s.Min), fmt.Sprintf(format, s.Max), unit)
}

// times formats v relative to the baseline's base.
func times(v, base float64, mode string) string {
	if mode == baseline || base == 0 {
		return ""
	}
	return fmt.Sprintf("×%.2f", v/base)
}

// mdCode makes s safe inside a markdown table's code span.
func mdCode(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return strings.ReplaceAll(s, "`", "'")
}

// countLocalFrom counts the samples whose LocalFrom is from.
func countLocalFrom(ss []sample, from string) int {
	n := 0
	for _, s := range ss {
		if s.LocalFrom == from {
			n++
		}
	}
	return n
}
