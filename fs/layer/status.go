package layer

import (
	"path/filepath"
)

// Status is what `lazylayer status` shows of one layer. It is the JSON the
// daemon's status endpoint serves.
type Status struct {
	Digest     string `json:"digest"`
	Snapshot   string `json:"snapshot"`
	State      string `json:"state"` // "lazy" or "local"
	Size       int64  `json:"size"`  // compressed size of the blob, when known
	Fetched    int64  `json:"fetched"`
	Requests   int64  `json:"requests"`
	Entries    int    `json:"entries,omitempty"`
	Mountpoint string `json:"mountpoint,omitempty"`
}

// StatusAddress is the unix socket of the status endpoint of the daemon
// whose snapshot API is at address.
func StatusAddress(address string) string {
	return filepath.Join(filepath.Dir(address), "status.sock")
}

// Stat fills in what the Manager knows of the layer in snapshot directory
// dir: for a lazy layer its size, what was fetched and its mountpoint.
func (m *Manager) Stat(dir string, st *Status) {
	m.mu.Lock()
	ll, ok := m.lazy[dir]
	m.mu.Unlock()
	if !ok {
		return
	}
	s := ll.layer.Stats()
	st.Size = ll.desc.Size
	st.Fetched = s.FetchedBytes
	st.Requests = s.Requests
	st.Entries = ll.layer.Entries()
	st.Mountpoint = filepath.Join(dir, lazyMount)
}
