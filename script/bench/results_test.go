package main

import (
	"testing"
)

func TestSummarize(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want stat
	}{
		{nil, stat{}},
		{[]float64{3}, stat{N: 1, Median: 3, Min: 3, Max: 3}},
		{[]float64{5, 1, 3}, stat{N: 3, Median: 3, Min: 1, Max: 5}},
		{[]float64{4, 1, 2, 10}, stat{N: 4, Median: 3, Min: 1, Max: 10}},
	} {
		if got := summarize(c.in); got != c.want {
			t.Errorf("summarize(%v) = %+v, want %+v", c.in, got, c.want)
		}
	}
}

func TestRangeOf(t *testing.T) {
	if got := rangeOf(stat{N: 3, Median: 1.5, Min: 1, Max: 2.25}, "%.2f s"); got != "1.50 s (1.00–2.25 s)" {
		t.Errorf("rangeOf = %q", got)
	}
	if got := rangeOf(stat{N: 1, Median: 7}, "%.0f MB"); got != "7 MB" {
		t.Errorf("rangeOf one value = %q", got)
	}
}
