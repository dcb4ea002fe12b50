package layer

import (
	"path/filepath"
	"strings"

	"github.com/moby/sys/mountinfo"

	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/fs/lazy"
)

// Stat fills in what the Manager knows of the layer in snapshot directory
// dir: for a layer with a FUSE mount (lazy, populating, or local but still
// used by containers started lazily) its progress and users, and with
// accessed, the files opened while it was lazy.
func (m *Manager) Stat(dir string, st *layerstatus.Layer, accessed bool) {
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
	if toc, ok := lazy.Capable(ll.desc); ok {
		st.TOC = toc.String()
	}
	st.Fetched = s.FetchedBytes + p.Fetched
	st.Held = p.Held
	if p.Elapsed > 0 {
		st.Rate = float64(p.Fetched) / p.Elapsed.Seconds()
	}
	st.Requests = s.Requests
	st.Reads = s.Reads
	st.Native = ll.native && ll.metaBuilt.Load()
	st.FUSERequests = s.FUSERequests
	st.FUSEBound = s.Bound
	st.Entries = ll.layer.Entries()
	st.View = ll.layer.View()
	ll.mu.Lock()
	st.HeldBack = !ll.released && m.cfg.Policy == PolicyManual
	if ll.err != nil {
		st.Error = ll.err.Error()
	}
	ll.mu.Unlock()
	st.Mountpoint = filepath.Join(dir, lazyMount)
	st.Users = overlayUsers(st.Mountpoint)
	if accessed {
		st.Accessed = ll.layer.Accessed()
	}
}

// Staging reports the layers fetched ahead and not yet claimed.
func (m *Manager) Staging() layerstatus.Staging {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := layerstatus.Staging{Limit: m.cfg.StagingLimit}
	for _, j := range m.jobs {
		if !staged(j) {
			continue
		}
		st.Layers++
		st.Reserved += j.desc.Size
		select {
		case <-j.done:
			st.Bytes += j.size
		default:
		}
	}
	return st
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
			// lazylayer's own native overlays list their layers
			// one by one (lowerdir+=, datadir+=).
			_, lower, ok := strings.Cut(opt, "=")
			if key, _, _ := strings.Cut(opt, "="); key != "lowerdir" && key != "lowerdir+" && key != "datadir+" {
				ok = false
			}
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
