package main

import (
	"strings"
	"testing"
)

// TestRenderHeld renders a results file with a held mode and an earlier
// run without counts, as the report on issue 9 does.
func TestRenderHeld(t *testing.T) {
	r := &results{
		Meta:     meta{Runs: 1, Versions: map[string]string{"lazylayer": "after"}},
		Images:   []imageInfo{{Name: "python", Layers: 2, Tree: "/usr"}},
		Profiles: []profileInfo{{Name: "unshaped"}},
		Modes: []modeInfo{{Name: baseline, Snapshotter: "overlayfs", Tag: tagGzip},
			{Name: "lazylayer-held", Snapshotter: "lazylayer", Tag: tagConverted, Held: true}},
	}
	steady := func(held float64) map[string]float64 {
		m := map[string]float64{}
		for _, k := range []string{"lazy", "local"} {
			for _, w := range steadyWhats() {
				m[steadyKey(k, w, "cold")], m[steadyKey(k, w, "warm")] = 2*held, held
			}
		}
		m[steadyKey("held", "find", "cold")], m[steadyKey("held", "find", "warm")] = 2*held, held
		return m
	}
	r.Samples = []sample{
		{Image: "python", Profile: "unshaped", Mode: baseline, Run: 1, Steady: steady(1)},
		{Image: "python", Profile: "unshaped", Mode: "lazylayer-held", Run: 1, Steady: steady(1.05), LocalFrom: "released",
			FUSE: map[string]int64{steadyKey("held", "find", "cold"): 0}, NativeLayers: 2,
			Mounts: []lazyMount{{Layer: 0, Entries: 6672, Seconds: 0.3}, {Layer: 1, Entries: 1609, Seconds: 0.05}}},
	}
	before := &results{Meta: meta{Versions: map[string]string{"lazylayer": "before"}}, Profiles: r.Profiles, Modes: r.Modes, Samples: []sample{
		r.Samples[0],
		{Image: "python", Profile: "unshaped", Mode: "lazylayer-held", Run: 1, Steady: steady(3),
			Mounts: []lazyMount{{Layer: 0, Entries: 6672, Seconds: 0.2}}},
	}}
	var w strings.Builder
	renderReport(&w, r, before, chartRefs{})
	for _, want := range []string{
		"| python | lazylayer-held | lazy, population held | find | cold | 2.000 s | 2.100 s | ×1.05 | ≤ 1.2, met | 0 | same | ×3.00 | not counted |",
		"| python | lazylayer-held | its layers turned local | tar /usr | warm | 1.000 s | 1.050 s | ×1.05 | ≤ 1.1, met | not counted | same | ×3.00 | not counted |",
		"- python, lazylayer-held: 2 of 2 layers native",
		"| python | 1 | 6672 | 300 ms | 200 ms |",
		"| python | 2 | 1609 | 50 ms | – |",
		"| python | lazylayer-held | held | – | – | – | – | 2.100 s ×1.05 | 1.050 s ×1.05 |",
	} {
		if !strings.Contains(w.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, w.String())
		}
	}
}
