package main

import "testing"

func TestFuseCountSince(t *testing.T) {
	from := fuseCount{byLayer: map[string]int64{"a": 10, "b": 5, "gone": 7}}
	to := fuseCount{byLayer: map[string]int64{"a": 12, "b": 5, "new": 3}}
	if got := to.since(from); got != 5 {
		t.Errorf("since = %d, want 5", got)
	}
}
