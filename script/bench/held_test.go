package main

import (
	"slices"
	"testing"
)

func TestFuseCountSince(t *testing.T) {
	from := fuseCount{byLayer: map[string]int64{"a": 10, "b": 5, "gone": 7}}
	to := fuseCount{byLayer: map[string]int64{"a": 12, "b": 5, "new": 3}}
	if got := to.since(from); got != 5 {
		t.Errorf("since = %d, want 5", got)
	}
}

func TestProfileModes(t *testing.T) {
	modes := []string{"overlayfs", "lazylayer-held"}
	for _, c := range []struct {
		profiles []string
		profile  string
		want     []string
	}{
		{[]string{"unshaped", "100mbit-20ms"}, "unshaped", modes},
		{[]string{"unshaped", "100mbit-20ms"}, "100mbit-20ms", []string{"overlayfs"}},
		{[]string{"100mbit-20ms"}, "100mbit-20ms", modes},
	} {
		if got := profileModes(options{profiles: c.profiles}, modes, c.profile); !slices.Equal(got, c.want) {
			t.Errorf("profileModes(%v, %s) = %v, want %v", c.profiles, c.profile, got, c.want)
		}
	}
}
