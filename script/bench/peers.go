package main

import "slices"

// The peers' releases, as script/bench/go.mod requires them (peers_test.go
// checks that they agree).
const (
	stargzVersion = "v0.19.1"
	sociVersion   = "v0.16.1"
)

// peerLocalSignal tells, if modes has a peer's, how its image was known to
// be local (see waitPeerLocal).
func peerLocalSignal(modes []string) string {
	if !slices.ContainsFunc(modes, func(m string) bool { return isPeer(findMode(m).snapshotter) }) {
		return ""
	}
	return "; stargz and soci (which report no per-layer state): when the registry side had sent as many bytes as the image's layers " +
		"(and, for soci, its SOCI index and zTOCs) since the pull began, early by what was fetched twice; \"never\" if nothing more came for a minute"
}
