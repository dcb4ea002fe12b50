package layer

import (
	"path/filepath"
	"strings"

	"github.com/moby/sys/mountinfo"
)

// Status is what `lazylayer status` shows of one layer. It is the JSON the
// daemon's status endpoint serves.
type Status struct {
	Digest     string  `json:"digest"`
	Snapshot   string  `json:"snapshot"`
	State      string  `json:"state"` // "lazy", "populating" or "local"
	Size       int64   `json:"size"`  // compressed size of the blob, when known
	Fetched    int64   `json:"fetched"`
	Held       int64   `json:"held"`              // bytes of the blob held locally
	Rate       float64 `json:"rate,omitempty"`    // population's bytes per second
	Requests   int64   `json:"requests"`          // on-demand ranged requests
	Reads      int64   `json:"reads"`             // FUSE reads served
	Entries    int     `json:"entries,omitempty"` // inodes of a lazy layer
	Mountpoint string  `json:"mountpoint,omitempty"`
	Users      int     `json:"users"` // overlays using the FUSE mount
	// Accessed lists the files opened while the layer was lazy, in
	// first-open order; only when asked for.
	Accessed []string `json:"accessed,omitempty"`
}

// StatusAddress is the unix socket of the status endpoint of the daemon
// whose snapshot API is at address.
func StatusAddress(address string) string {
	return filepath.Join(filepath.Dir(address), "status.sock")
}

// Stat fills in what the Manager knows of the layer in snapshot directory
// dir: for a layer with a FUSE mount (lazy, populating, or local but still
// used by containers started lazily) its progress and users, and with
// accessed, the files opened while it was lazy.
func (m *Manager) Stat(dir string, st *Status, accessed bool) {
	m.mu.Lock()
	ll, ok := m.lazy[dir]
	m.mu.Unlock()
	if !ok {
		return
	}
	s := ll.layer.Stats()
	p := ll.layer.Progress()
	st.State = ll.state.Load().(string)
	st.Size = ll.desc.Size
	st.Fetched = s.FetchedBytes + p.Fetched
	st.Held = p.Held
	if p.Elapsed > 0 {
		st.Rate = float64(p.Fetched) / p.Elapsed.Seconds()
	}
	st.Requests = s.Requests
	st.Reads = s.Reads
	st.Entries = ll.layer.Entries()
	st.Mountpoint = filepath.Join(dir, lazyMount)
	st.Users = overlayUsers(st.Mountpoint)
	if accessed {
		st.Accessed = ll.layer.Accessed()
	}
}

// overlayUsers counts the overlay mounts whose lower layers include the
// directory mp. containerd may shorten long lowerdir lists to paths
// relative to a common parent, so a suffix of mp counts too.
func overlayUsers(mp string) int {
	overlays, err := mountinfo.GetMounts(mountinfo.FSTypeFilter("overlay"))
	if err != nil {
		return 0
	}
	suffix := "/" + filepath.Base(filepath.Dir(mp)) + "/" + filepath.Base(mp)
	n := 0
	for _, o := range overlays {
		for _, opt := range strings.Split(o.VFSOptions, ",") {
			lower, ok := strings.CutPrefix(opt, "lowerdir=")
			if !ok {
				continue
			}
			for _, dir := range strings.Split(lower, ":") {
				if dir == mp || strings.HasSuffix("/"+dir, suffix) {
					n++
					break
				}
			}
		}
	}
	return n
}
